//! The `[policy]` section of the configuration, as written. [`super::Policy::compile`] checks it
//! and turns it into the form `decide` uses.

use serde::de::{self, Deserializer, IntoDeserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;

/// `[policy]`: named roles, and rules that give principals roles.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default)]
    pub roles: BTreeMap<String, RoleConfig>,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

/// `[policy.roles.NAME]`: permission patterns (globs in which `*` also crosses `:` and `.`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

/// `[[policy.rules]]`: every selector given must match (AND); a list inside one selector is an OR.
/// Local selectors (uid … parent_exe) only match local peers; cert selectors only certificate peers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<OneOrMany<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<OneOrMany<String>>,
    /// Primary or supplementary group name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<OneOrMany<String>>,
    /// Primary or supplementary gid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<OneOrMany<u32>>,
    /// Glob on the executable path; `*` stays within one path component, `**` crosses them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<OneOrMany<String>>,
    /// SHA-256 of the executable's content, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe_sha256: Option<OneOrMany<String>>,
    /// Glob on the systemd unit (`nginx.service`, `php*-fpm.service`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<OneOrMany<String>>,
    /// Glob on the executable of any ancestor process. Weaker than `exe`: any program such an
    /// ancestor starts matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_exe: Option<OneOrMany<String>>,
    /// Glob on the client certificate's CN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_cn: Option<OneOrMany<String>>,
    /// Client certificate id (hex SHA-256 of issuer and serial).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_id: Option<OneOrMany<String>>,
    /// Glob on the client certificate's SANs (DNS names, IP addresses, URIs, e-mail
    /// addresses); matches when any SAN does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_san: Option<OneOrMany<String>>,
    /// Matches every principal. Must be said explicitly, and alone.
    #[serde(default, skip_serializing_if = "is_false")]
    pub any: bool,
    pub roles: Vec<String>,
    /// The key this principal signs Lumo-dialect requests with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac_key_file: Option<PathBuf>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A selector value written either alone (`uid = 33`) or as a list (`uid = [33, 1000]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OneOrMany<T>(pub Vec<T>);

impl<T> From<T> for OneOrMany<T> {
    fn from(one: T) -> Self {
        OneOrMany(vec![one])
    }
}

impl<T> From<Vec<T>> for OneOrMany<T> {
    fn from(many: Vec<T>) -> Self {
        OneOrMany(many)
    }
}

impl From<&str> for OneOrMany<String> {
    fn from(one: &str) -> Self {
        OneOrMany(vec![one.to_string()])
    }
}

impl<T: Serialize> Serialize for OneOrMany<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);

        impl<T> V<T> {
            fn one<'de, E: de::Error>(d: impl Deserializer<'de, Error = E>) -> Result<Vec<T>, E>
            where
                T: Deserialize<'de>,
            {
                T::deserialize(d).map(|t| vec![t])
            }
        }

        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Vec<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element()? {
                    out.push(item);
                }
                Ok(out)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Vec<T>, E> {
                Self::one(v.into_deserializer())
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Vec<T>, E> {
                Self::one(v.into_deserializer())
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<T>, E> {
                Self::one(v.into_deserializer())
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Vec<T>, E> {
                Self::one(v.into_deserializer())
            }
        }

        d.deserialize_any(V(PhantomData)).map(OneOrMany)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(toml_text: &str) -> Result<RuleConfig, toml::de::Error> {
        toml::from_str(toml_text)
    }

    #[test]
    fn selectors_take_one_value_or_a_list() {
        let r = rule("uid = 33\nuser = \"www-data\"\nroles = [\"r\"]").unwrap();
        assert_eq!(r.uid, Some(OneOrMany(vec![33])));
        assert_eq!(r.user, Some(OneOrMany(vec!["www-data".to_string()])));
        let r = rule("uid = [33, 1000]\nexe = [\"/a\", \"/b\"]\nroles = []").unwrap();
        assert_eq!(r.uid, Some(OneOrMany(vec![33, 1000])));
        assert_eq!(r.exe.unwrap().0.len(), 2);
    }

    #[test]
    fn selector_values_of_the_wrong_type_are_refused() {
        for bad in [
            "uid = -1\nroles = []",
            "uid = \"root\"\nroles = []",
            "uid = [33, \"x\"]\nroles = []",
            "user = 33\nroles = []",
            "uid = 4294967296\nroles = []",
        ] {
            assert!(rule(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_and_a_missing_roles_key_are_refused() {
        let err = rule("uid = 1\nrole = [\"x\"]").unwrap_err().to_string();
        assert!(err.contains("unknown field `role`"), "{err}");
        let err = rule("uid = 1").unwrap_err().to_string();
        assert!(err.contains("missing field `roles`"), "{err}");
        let err = toml::from_str::<PolicyConfig>("[roles.a]\nallows = []")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `allows`"), "{err}");
    }

    #[test]
    fn config_round_trips_through_toml() {
        let text = r#"
            [roles.reader]
            allow = ["secrets:read:db_*"]
            [[rules]]
            uid = [33, 1000]
            group = "webpanel"
            roles = ["reader"]
            hmac_key_file = "/etc/warden/panel.key"
        "#;
        let cfg: PolicyConfig = toml::from_str(text).unwrap();
        let again: PolicyConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(cfg, again);
    }
}
