//! Who may do what: the `[auth]` settings as written, and the policy compiled from them.
//!
//! A principal is named, and is recognised by a bearer token (only its SHA-256 is stored,
//! compared in constant time against every principal) and/or by its client certificate's
//! subject or one of its subject alternative names. A grant gives one principal (or `*`, every
//! authenticated principal, or `anonymous`) actions on topics and groups named by globs; a
//! grant's `deny` list wins over every `allow`. Once access control is on (`required = true`,
//! or any principal configured), whatever no grant allows is denied.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// The name of callers that present no credentials (only reachable with `required = false`).
pub const ANONYMOUS: &str = "anonymous";

/// What a caller does to a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Send to a topic.
    Produce,
    /// Subscribe to a topic, join a group, ack and nack.
    Consume,
    /// List and describe topics and groups.
    Describe,
    /// Create and delete topics (auto-creation included), reset and delete groups, compaction.
    Admin,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Produce => "produce",
            Action::Consume => "consume",
            Action::Describe => "describe",
            Action::Admin => "admin",
        }
    }
}

/// What an action is done to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    Topic(&'a str),
    Group(&'a str),
}

impl std::fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::Topic(t) => write!(f, "topic {t:?}"),
            Resource::Group(g) => write!(f, "group {g:?}"),
        }
    }
}

/// `[auth]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Refuse calls without valid credentials (`UNAUTHENTICATED`). Default: false.
    pub required: bool,
    /// Serve gRPC reflection (to authenticated callers once access control is on).
    /// Default: true.
    pub reflection: bool,
    /// How long `_audit` keeps its records, in ms; 0 keeps them for ever. Only this setting
    /// shortens the audit trail. Default: 0.
    pub audit_retention_ms: u64,
    /// `[[auth.principals]]`.
    pub principals: Vec<PrincipalConfig>,
    /// `[[auth.grants]]`.
    pub grants: Vec<GrantConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            required: false,
            reflection: true,
            audit_retention_ms: 0,
            principals: Vec::new(),
            grants: Vec::new(),
        }
    }
}

/// `[[auth.principals]]`: a name and how it is recognised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PrincipalConfig {
    pub name: String,
    /// Hex SHA-256 of the principal's bearer token (`sluice auth token NAME` prints both).
    pub token_sha256: String,
    /// The client certificate's subject (`CN=…, O=…` as `openssl x509 -subject` prints it
    /// in RFC 2253 order) or one of its DNS, email or URI alternative names.
    pub tls_subject: String,
}

/// `[[auth.grants]]`: actions of one principal on topics and groups named by globs (`*` matches
/// any run of characters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct GrantConfig {
    /// A principal's name, `*` for every authenticated principal, or `anonymous`.
    pub principal: String,
    pub topics: Vec<String>,
    pub groups: Vec<String>,
    pub allow: Vec<Action>,
    /// Actions refused on these topics and groups whatever any grant allows.
    pub deny: Vec<Action>,
}

/// A known principal.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: Arc<str>,
    token_sha256: Option<[u8; 32]>,
    tls_subject: Option<String>,
}

/// The compiled `[auth]` settings.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Access control is on: deny whatever no grant allows.
    pub enabled: bool,
    pub required: bool,
    pub reflection: bool,
    principals: Vec<Principal>,
    grants: Vec<GrantConfig>,
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// SHA-256 of a token, as stored in `token_sha256`.
pub fn token_hash(token: &str) -> [u8; 32] {
    sha256(token.as_bytes())
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex_32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// `*` matches any run of characters (empty included); everything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was, and the name position it currently stands for.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

impl Policy {
    /// Compiles and checks the settings: names unique and non-empty, hashes well formed,
    /// every grant naming a known principal.
    pub fn from_config(c: &AuthConfig) -> Result<Policy, String> {
        let mut principals: Vec<Principal> = Vec::new();
        for p in &c.principals {
            if p.name.is_empty() || p.name == "*" || p.name == ANONYMOUS {
                return Err(format!(
                    "auth.principals: {:?} is not a usable principal name",
                    p.name
                ));
            }
            if principals.iter().any(|q| *q.name == *p.name) {
                return Err(format!("auth.principals: {:?} appears twice", p.name));
            }
            let token_sha256 = match p.token_sha256.as_str() {
                "" => None,
                hex => Some(from_hex_32(&hex.to_ascii_lowercase()).ok_or_else(|| {
                    format!(
                        "auth.principals {:?}: token_sha256 must be 64 hex digits",
                        p.name
                    )
                })?),
            };
            let tls_subject = (!p.tls_subject.is_empty()).then(|| p.tls_subject.clone());
            if token_sha256.is_none() && tls_subject.is_none() {
                return Err(format!(
                    "auth.principals {:?}: needs token_sha256 or tls_subject",
                    p.name
                ));
            }
            principals.push(Principal {
                name: Arc::from(p.name.as_str()),
                token_sha256,
                tls_subject,
            });
        }
        for g in &c.grants {
            let known = g.principal == "*"
                || g.principal == ANONYMOUS
                || principals.iter().any(|p| *p.name == *g.principal);
            if !known {
                return Err(format!(
                    "auth.grants: principal {:?} is not in auth.principals",
                    g.principal
                ));
            }
            if g.topics.is_empty() && g.groups.is_empty() {
                return Err(format!(
                    "auth.grants for {:?}: name topics or groups (\"*\" for all)",
                    g.principal
                ));
            }
        }
        Ok(Policy {
            enabled: c.required || !c.principals.is_empty(),
            required: c.required,
            reflection: c.reflection,
            principals,
            grants: c.grants.clone(),
        })
    }

    /// The principal whose token this is. Every principal's hash is compared, in constant
    /// time, whatever matches.
    pub fn by_token(&self, token: &str) -> Option<&Principal> {
        let hash = token_hash(token);
        let mut found = None;
        for p in &self.principals {
            if let Some(h) = &p.token_sha256
                && bool::from(h.ct_eq(&hash))
            {
                found = Some(p);
            }
        }
        found
    }

    /// The principal a client certificate with these names (subject first) maps to.
    pub fn by_certificate(&self, names: &[String]) -> Option<&Principal> {
        self.principals.iter().find(|p| {
            p.tls_subject
                .as_ref()
                .is_some_and(|s| names.iter().any(|n| n == s))
        })
    }

    /// Whether `principal` (`None`: anonymous) may do `action` to `resource`.
    pub fn allows(&self, principal: Option<&str>, action: Action, resource: Resource<'_>) -> bool {
        if !self.enabled {
            return true;
        }
        let who = principal.unwrap_or(ANONYMOUS);
        let mut allowed = false;
        for g in &self.grants {
            let applies = g.principal == who || (g.principal == "*" && principal.is_some());
            let names = match resource {
                // Internal topics (the audit trail) are named only by patterns that start with
                // `_` themselves: `*` does not hand out the audit trail.
                Resource::Topic(t) if t.starts_with('_') => g
                    .topics
                    .iter()
                    .any(|p| p.starts_with('_') && glob_match(p, t)),
                Resource::Topic(t) => g.topics.iter().any(|p| glob_match(p, t)),
                Resource::Group(n) => g.groups.iter().any(|p| glob_match(p, n)),
            };
            if !applies || !names {
                continue;
            }
            if g.deny.contains(&action) {
                return false;
            }
            allowed |= g.allow.contains(&action);
        }
        allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_documented() {
        let cases = [
            ("*", "", true),
            ("*", "anything", true),
            ("epro.*", "epro.q1", true),
            ("epro.*", "epro.", true),
            ("epro.*", "eprox", false),
            ("*.dlq", "a.b.dlq", true),
            ("*.dlq", "a.dlq.x", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("", "", true),
            ("", "x", false),
        ];
        for (p, n, want) in cases {
            assert_eq!(glob_match(p, n), want, "{p:?} vs {n:?}");
        }
    }

    fn config(toml: &str) -> AuthConfig {
        toml::from_str(toml).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn deny_wins_and_whatever_no_grant_allows_is_denied() {
        let c = config(&format!(
            r#"
            required = true
            [[principals]]
            name = "app"
            token_sha256 = "{}"
            [[grants]]
            principal = "app"
            topics = ["epro.*"]
            groups = ["etl"]
            allow = ["produce", "consume", "describe", "admin"]
            [[grants]]
            principal = "app"
            topics = ["epro.locked"]
            deny = ["admin"]
            [[grants]]
            principal = "*"
            topics = ["public"]
            allow = ["describe"]
            "#,
            to_hex(&token_hash("t"))
        ));
        let p = Policy::from_config(&c).unwrap();
        let app = Some("app");
        assert!(p.allows(app, Action::Produce, Resource::Topic("epro.q")));
        assert!(p.allows(app, Action::Admin, Resource::Topic("epro.q")));
        assert!(!p.allows(app, Action::Admin, Resource::Topic("epro.locked")));
        assert!(p.allows(app, Action::Produce, Resource::Topic("epro.locked")));
        assert!(!p.allows(app, Action::Produce, Resource::Topic("other")));
        assert!(p.allows(app, Action::Consume, Resource::Group("etl")));
        assert!(!p.allows(app, Action::Consume, Resource::Group("etl2")));
        assert!(p.allows(app, Action::Describe, Resource::Topic("public")));
        // `*` covers every topic but the internal ones, which need a pattern of their own.
        let internal = Policy::from_config(&config(
            r#"
            required = true
            [[grants]]
            principal = "anonymous"
            topics = ["*"]
            allow = ["consume"]
            [[grants]]
            principal = "anonymous"
            topics = ["_au*"]
            allow = ["describe"]
            "#,
        ))
        .unwrap();
        assert!(internal.allows(None, Action::Consume, Resource::Topic("epro")));
        assert!(!internal.allows(None, Action::Consume, Resource::Topic("_audit")));
        assert!(internal.allows(None, Action::Describe, Resource::Topic("_audit")));
        assert!(!p.allows(None, Action::Describe, Resource::Topic("public")));
        assert_eq!(p.by_token("t").map(|p| &*p.name), Some("app"));
        assert!(p.by_token("u").is_none());
    }

    #[test]
    fn without_principals_or_required_everything_is_allowed() {
        let p = Policy::from_config(&AuthConfig::default()).unwrap();
        assert!(!p.enabled);
        assert!(p.allows(None, Action::Admin, Resource::Topic("x")));
    }

    #[test]
    fn bad_settings_are_named() {
        let cases = [
            ("[[principals]]\nname = \"a\"\n", "needs token_sha256"),
            (
                "[[principals]]\nname = \"a\"\ntoken_sha256 = \"xyz\"\n",
                "64 hex digits",
            ),
            (
                "[[grants]]\nprincipal = \"ghost\"\ntopics = [\"*\"]\n",
                "not in auth.principals",
            ),
            (
                "[[principals]]\nname = \"anonymous\"\ntls_subject = \"CN=a\"\n",
                "not a usable",
            ),
        ];
        for (toml, want) in cases {
            let err = Policy::from_config(&config(toml)).unwrap_err();
            assert!(err.contains(want), "{toml}: {err}");
        }
    }
}
