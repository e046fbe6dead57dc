//! Label and field selectors, as the apiserver parses them from `labelSelector=` and
//! `fieldSelector=`.
//!
//! Label selectors: comma-separated requirements `key`, `!key`, `key=value`, `key==value`,
//! `key!=value`, `key in (a,b)`, `key notin (a,b)`. Field selectors: `metadata.name` and
//! `metadata.namespace` with `=`, `==` or `!=`.

use std::collections::BTreeSet;

use serde_json::Value;

/// One label requirement.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum LabelRequirement {
    Exists(String),
    DoesNotExist(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
}

impl LabelRequirement {
    fn matches(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        match self {
            LabelRequirement::Exists(k) => get(k).is_some(),
            LabelRequirement::DoesNotExist(k) => get(k).is_none(),
            LabelRequirement::Equals(k, v) => get(k) == Some(v.as_str()),
            // Like Kubernetes: `key!=value` also matches objects without the label.
            LabelRequirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            LabelRequirement::In(k, vs) => get(k).is_some_and(|x| vs.contains(x)),
            LabelRequirement::NotIn(k, vs) => get(k).is_none_or(|x| !vs.contains(x)),
        }
    }
}

/// A parsed `labelSelector`; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub requirements: Vec<LabelRequirement>,
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<LabelSelector, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            requirements.push(parse_requirement(part)?);
        }
        Ok(LabelSelector { requirements })
    }

    /// Whether the object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object);
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// The requirements as a sorted set of their canonical texts (`!a`, `b=c`, ...), so two
    /// selectors that differ only in order compare equal.
    pub fn canonical(&self) -> BTreeSet<String> {
        self.requirements
            .iter()
            .map(|r| match r {
                LabelRequirement::Exists(k) => k.clone(),
                LabelRequirement::DoesNotExist(k) => format!("!{k}"),
                LabelRequirement::Equals(k, v) => format!("{k}={v}"),
                LabelRequirement::NotEquals(k, v) => format!("{k}!={v}"),
                LabelRequirement::In(k, vs) => {
                    format!(
                        "{k} in ({})",
                        vs.iter().cloned().collect::<Vec<_>>().join(",")
                    )
                }
                LabelRequirement::NotIn(k, vs) => {
                    format!(
                        "{k} notin ({})",
                        vs.iter().cloned().collect::<Vec<_>>().join(",")
                    )
                }
            })
            .collect()
    }
}

/// Splits at commas that are not inside parentheses (`a in (x,y),!b`).
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn check_key(key: &str, whole: &str) -> Result<String, String> {
    let key = key.trim();
    let valid = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if valid {
        Ok(key.to_string())
    } else {
        Err(format!(
            "invalid label key {key:?} in requirement {whole:?}"
        ))
    }
}

fn check_value(value: &str, whole: &str) -> Result<String, String> {
    let value = value.trim();
    let valid = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if valid {
        Ok(value.to_string())
    } else {
        Err(format!(
            "invalid label value {value:?} in requirement {whole:?}"
        ))
    }
}

fn parse_set(rest: &str, whole: &str) -> Result<BTreeSet<String>, String> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected a (value,...) set in {whole:?}"))?;
    inner.split(',').map(|v| check_value(v, whole)).collect()
}

fn parse_requirement(part: &str) -> Result<LabelRequirement, String> {
    if let Some(key) = part.strip_prefix('!') {
        return Ok(LabelRequirement::DoesNotExist(check_key(key, part)?));
    }
    if let Some((k, v)) = part.split_once("!=") {
        return Ok(LabelRequirement::NotEquals(
            check_key(k, part)?,
            check_value(v, part)?,
        ));
    }
    if let Some((k, v)) = part.split_once("==") {
        return Ok(LabelRequirement::Equals(
            check_key(k, part)?,
            check_value(v, part)?,
        ));
    }
    if let Some((k, v)) = part.split_once('=') {
        return Ok(LabelRequirement::Equals(
            check_key(k, part)?,
            check_value(v, part)?,
        ));
    }
    if let Some((k, rest)) = part.split_once(" notin ") {
        return Ok(LabelRequirement::NotIn(
            check_key(k, part)?,
            parse_set(rest, part)?,
        ));
    }
    if let Some((k, rest)) = part.split_once(" in ") {
        return Ok(LabelRequirement::In(
            check_key(k, part)?,
            parse_set(rest, part)?,
        ));
    }
    Ok(LabelRequirement::Exists(check_key(part, part)?))
}

/// One field requirement: `metadata.name` or `metadata.namespace`, equal or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRequirement {
    pub field: String,
    pub value: String,
    pub equal: bool,
}

/// A parsed `fieldSelector`; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    pub requirements: Vec<FieldRequirement>,
}

impl FieldSelector {
    pub fn parse(text: &str) -> Result<FieldSelector, String> {
        let mut requirements = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, value, equal) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, v, true)
            } else {
                return Err(format!("invalid field selector requirement {part:?}"));
            };
            let field = field.trim();
            if field != "metadata.name" && field != "metadata.namespace" {
                return Err(format!(
                    "field label not supported: {field} (only metadata.name and metadata.namespace)"
                ));
            }
            requirements.push(FieldRequirement {
                field: field.to_string(),
                value: value.trim().to_string(),
                equal,
            });
        }
        Ok(FieldSelector { requirements })
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.requirements.iter().all(|r| {
            let pointer = match r.field.as_str() {
                "metadata.name" => "/metadata/name",
                _ => "/metadata/namespace",
            };
            let actual = object
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or("");
            (actual == r.value) == r.equal
        })
    }
}

/// Both selectors of a list or watch request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selectors {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    /// The namespace of a namespaced request path (`/namespaces/<ns>/...`), if any.
    pub namespace: Option<String>,
}

impl Selectors {
    pub fn matches(&self, object: &Value) -> bool {
        let ns_ok = self.namespace.as_deref().is_none_or(|ns| {
            object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                == Some(ns)
        });
        ns_ok && self.labels.matches(object) && self.fields.matches(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "default", "labels": labels}})
    }

    #[test]
    fn kube_proxy_selector() {
        let s = LabelSelector::parse(
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless",
        )
        .unwrap();
        assert!(s.matches(&obj(json!({"app": "web"}))));
        assert!(s.matches(&json!({"metadata": {"name": "x"}})));
        assert!(!s.matches(&obj(json!({"service.kubernetes.io/headless": ""}))));
        assert!(!s.matches(&obj(
            json!({"service.kubernetes.io/service-proxy-name": "x"})
        )));
        assert_eq!(
            s.canonical(),
            BTreeSet::from([
                "!service.kubernetes.io/headless".to_string(),
                "!service.kubernetes.io/service-proxy-name".to_string()
            ])
        );
    }

    #[test]
    fn equality_and_sets() {
        let s =
            LabelSelector::parse("app=web,tier!=db,env in (a, b),zone notin (z1),team").unwrap();
        assert!(s.matches(&obj(json!({"app": "web", "env": "a", "team": "x"}))));
        assert!(!s.matches(&obj(json!({"app": "web", "env": "a"}))));
        assert!(!s.matches(&obj(json!({"app": "web", "env": "c", "team": "x"}))));
        assert!(!s.matches(&obj(
            json!({"app": "web", "env": "a", "team": "x", "tier": "db"})
        )));
        assert!(!s.matches(&obj(
            json!({"app": "web", "env": "b", "team": "x", "zone": "z1"})
        )));
        assert!(LabelSelector::parse("app==web")
            .unwrap()
            .matches(&obj(json!({"app": "web"}))));
        assert!(LabelSelector::parse("").unwrap().matches(&obj(json!({}))));
        assert!(LabelSelector::parse("a b").is_err());
        assert!(LabelSelector::parse("a=(").is_err());
    }

    #[test]
    fn field_selectors() {
        let o = obj(json!({}));
        assert!(FieldSelector::parse("metadata.name=web")
            .unwrap()
            .matches(&o));
        assert!(!FieldSelector::parse("metadata.name=db")
            .unwrap()
            .matches(&o));
        assert!(
            FieldSelector::parse("metadata.name!=db,metadata.namespace==default")
                .unwrap()
                .matches(&o)
        );
        assert!(FieldSelector::parse("spec.nodeName=x").is_err());
    }
}
