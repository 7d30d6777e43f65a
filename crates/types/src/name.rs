//! Validated names. A name is also a path component on disk and a key in the store, so the rules
//! rule out path traversal by construction: no `/`, no `..`, no leading dot, bounded length.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{kind} name is empty")]
    Empty { kind: &'static str },
    #[error("{kind} name {name:?} is longer than {max} characters")]
    TooLong {
        kind: &'static str,
        name: String,
        max: usize,
    },
    #[error("{kind} name {name:?} has the character {character:?} at position {position}; {rule}")]
    BadCharacter {
        kind: &'static str,
        name: String,
        character: char,
        position: usize,
        rule: &'static str,
    },
    #[error("label {text:?} is not KEY=VALUE (for example zone=eu-1)")]
    NotKeyValue { text: String },
}

const VM_RULE: &str = "use lowercase letters, digits and '-', starting with a letter or digit";
const IMAGE_RULE: &str = "use letters, digits, '.', '_' and '-', starting with a letter or digit";
const LABEL_KEY_RULE: &str =
    "use letters, digits, '.', '_', '-' and '/', starting with a letter or digit";
const LABEL_VALUE_RULE: &str =
    "use letters, digits, '.', '_' and '-', starting with a letter or digit";

/// Longest label key, label value and anti-affinity group name.
pub const LABEL_MAX_LEN: usize = 63;

/// Host labels (`zone=eu-1`), or the labels a VM requires of its host.
pub type Labels = std::collections::BTreeMap<String, String>;

/// Checks one label's key and value.
pub fn validate_label(key: &str, value: &str) -> Result<(), NameError> {
    validate(
        "label key",
        key,
        LABEL_MAX_LEN,
        |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'),
        LABEL_KEY_RULE,
    )?;
    validate(
        "label value",
        value,
        LABEL_MAX_LEN,
        |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'),
        LABEL_VALUE_RULE,
    )
}

/// Checks every label of a set.
pub fn validate_labels(labels: &Labels) -> Result<(), NameError> {
    labels
        .iter()
        .try_for_each(|(key, value)| validate_label(key, value))
}

/// Parses `KEY=VALUE` (a command-line label).
pub fn parse_label(text: &str) -> Result<(String, String), NameError> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(NameError::NotKeyValue {
            text: text.to_string(),
        });
    };
    validate_label(key, value)?;
    Ok((key.to_string(), value.to_string()))
}

/// Checks an anti-affinity group name (the rules of a VM name).
pub fn validate_group(group: &str) -> Result<(), NameError> {
    validate(
        "anti-affinity group",
        group,
        LABEL_MAX_LEN,
        |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-',
        VM_RULE,
    )
}

/// Checks a shared storage's name (`serve --shared-storage NAME=PATH`; the rules of a VM name).
pub fn validate_storage_name(name: &str) -> Result<(), NameError> {
    validate(
        "shared storage",
        name,
        LABEL_MAX_LEN,
        |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-',
        VM_RULE,
    )
}

fn validate(
    kind: &'static str,
    name: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
    rule: &'static str,
) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.chars().count() > max {
        return Err(NameError::TooLong {
            kind,
            name: name.to_string(),
            max,
        });
    }
    for (position, character) in name.chars().enumerate() {
        let first_ok = position > 0 || character.is_ascii_alphanumeric();
        if !allowed(character) || !first_ok {
            return Err(NameError::BadCharacter {
                kind,
                name: name.to_string(),
                character,
                position,
                rule,
            });
        }
    }
    Ok(())
}

/// A VM name: a DNS label (lowercase letters, digits, '-', at most 63 characters).
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(try_from = "String", into = "String")]
pub struct VmName(String);

impl VmName {
    pub const MAX_LEN: usize = 63;

    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        validate(
            "vm",
            &name,
            Self::MAX_LEN,
            |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-',
            VM_RULE,
        )?;
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An image name (letters, digits, '.', '_', '-', at most 128 characters, no leading dot).
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(try_from = "String", into = "String")]
pub struct ImageName(String);

impl ImageName {
    pub const MAX_LEN: usize = 128;

    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        validate(
            "image",
            &name,
            Self::MAX_LEN,
            |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'),
            IMAGE_RULE,
        )?;
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_newtype_conversions {
    ($name:ident) => {
        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }
        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str(&self.0)
            }
        }
        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(value: &str) -> Result<Self, Self::Err> {
                Self::new(value)
            }
        }
    };
}
string_newtype_conversions!(VmName);
string_newtype_conversions!(ImageName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_accept_dns_labels() {
        for good in ["web", "web-1", "1a", "a".repeat(63).as_str()] {
            assert_eq!(VmName::new(good).unwrap().as_str(), good);
        }
    }

    #[test]
    fn vm_names_refuse_traversal_and_bad_characters() {
        for bad in [
            "",
            "../etc",
            "a/b",
            "-x",
            "Web",
            "a b",
            "a.b",
            "é",
            &"a".repeat(64),
        ] {
            assert!(VmName::new(bad).is_err(), "{bad:?} must be refused");
        }
        let error = VmName::new("a/b").unwrap_err().to_string();
        assert!(
            error.contains("'/'") && error.contains("position 1"),
            "{error}"
        );
    }

    #[test]
    fn image_names_refuse_traversal() {
        for bad in ["..", ".hidden", "a/b", "a\\b", "", "a\0b"] {
            assert!(ImageName::new(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(ImageName::new("debian-12.qcow2").is_ok());
    }

    #[test]
    fn labels_parse_and_refuse_clearly() {
        assert_eq!(
            parse_label("zone=eu-1").unwrap(),
            ("zone".to_string(), "eu-1".to_string())
        );
        assert_eq!(
            parse_label("novacron.io/disk=ssd").unwrap().0,
            "novacron.io/disk"
        );
        for bad in [
            "zone",
            "=x",
            "zone=",
            "zone=a b",
            "-k=v",
            "k=v=w",
            &format!("k={}", "v".repeat(64)),
        ] {
            assert!(parse_label(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(
            parse_label("zone")
                .unwrap_err()
                .to_string()
                .contains("KEY=VALUE")
        );
        assert!(validate_group("web").is_ok());
        assert!(validate_group("Web").is_err());
    }

    #[test]
    fn names_deserialize_through_validation() {
        let refused: Result<VmName, _> = serde_json::from_str("\"../x\"");
        assert!(refused.is_err());
        let accepted: VmName = serde_json::from_str("\"ok-1\"").unwrap();
        assert_eq!(accepted.as_str(), "ok-1");
    }
}
