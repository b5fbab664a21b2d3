//! Secrets that must never reach a log line.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A secret string (a join token, a key). `Debug` and `Display` print `***`; the value is only
/// reachable through [`Secret::expose`], which makes every use easy to find.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }
}

/// Reads a token argument: a value, or, when it is an absolute path, the file's contents
/// (whitespace trimmed). Errors are one sentence naming the file.
pub fn token_from_arg(arg: &str) -> Result<Secret, String> {
    if !arg.starts_with('/') {
        let value = arg.trim();
        if value.is_empty() {
            return Err("the token is empty".into());
        }
        return Ok(Secret::new(value));
    }
    let text =
        std::fs::read_to_string(arg).map_err(|e| format!("cannot read token file {arg}: {e}"))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(format!("token file {arg} is empty"));
    }
    if value.contains(char::is_whitespace) {
        return Err(format!(
            "token file {arg} holds more than one word; it must hold exactly one token"
        ));
    }
    Ok(Secret::new(value))
}

#[cfg(test)]
mod token_arg_tests {
    use super::*;

    #[test]
    fn values_and_files() {
        assert_eq!(token_from_arg(" abc ").unwrap().expose(), "abc");
        let dir = std::env::temp_dir().join(format!("burrow-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "  s3cret-value\n").unwrap();
        assert_eq!(
            token_from_arg(file.to_str().unwrap()).unwrap().expose(),
            "s3cret-value"
        );
        std::fs::write(&file, "\n \n").unwrap();
        let e = token_from_arg(file.to_str().unwrap()).unwrap_err();
        assert!(e.ends_with("is empty"), "{e}");
        let e = token_from_arg(dir.join("missing").to_str().unwrap()).unwrap_err();
        assert!(e.starts_with("cannot read token file"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
