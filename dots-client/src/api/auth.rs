//! Who is calling: a bearer token from the tokens file, or a client
//! certificate from the API's client CA. Every call needs one of them, and
//! the audit trail names it.
//!
//! The tokens file has one credential per line, `NAME TOKEN`; `#` starts a
//! comment. Names say who holds the token ("fastnetmon", "portal"); a
//! token is at least 16 characters. Only SHA-256 digests are kept in
//! memory and compared in constant time. The file is re-read on reload.

use std::path::{Path, PathBuf};

use openssl::{hash::MessageDigest, memcmp};

/// Why the tokens file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Shortest token accepted: 16 characters (96 bits in base64).
pub const MIN_TOKEN_LEN: usize = 16;

/// The bearer tokens, by holder name.
#[derive(Clone, Default)]
pub struct Tokens {
    entries: Vec<(String, [u8; 32])>,
}

fn digest(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    if let Ok(d) = openssl::hash::hash(MessageDigest::sha256(), token.as_bytes()) {
        out.copy_from_slice(&d);
    }
    out
}

impl Tokens {
    /// Parses a tokens file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Tokens, TokensError> {
        let mut entries: Vec<(String, [u8; 32])> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |message: String| TokensError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            };
            let mut words = line.split_whitespace();
            let (Some(name), Some(token), None) = (words.next(), words.next(), words.next()) else {
                return Err(bad("expected `NAME TOKEN`".into()));
            };
            if token.len() < MIN_TOKEN_LEN {
                return Err(bad(format!(
                    "the token of {name:?} is {} characters: at least {MIN_TOKEN_LEN}",
                    token.len()
                )));
            }
            if entries.iter().any(|(n, _)| n == name) {
                return Err(bad(format!("{name:?} is listed twice")));
            }
            let d = digest(token);
            if entries.iter().any(|(_, e)| e == &d) {
                return Err(bad(format!(
                    "the token of {name:?} is also another holder's: each holder needs its own"
                )));
            }
            entries.push((name.to_string(), d));
        }
        Ok(Tokens { entries })
    }

    /// Reads the tokens file.
    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Tokens::parse(&text, path)
    }

    /// The holder of `token`.
    pub fn holder(&self, token: &str) -> Option<&str> {
        let d = digest(token);
        // Look at every entry, so the time does not tell which matched.
        let mut found = None;
        for (name, e) in &self.entries {
            if memcmp::eq(e, &d) {
                found = Some(name.as_str());
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_file() {
        let p = Path::new("/etc/dots-client/api-tokens");
        let t = Tokens::parse(
            "# holders\nfastnetmon  s3cr3t-token-0001-abcdef\nportal s3cr3t-token-0002-abcdef # the portal\n\n",
            p,
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.holder("s3cr3t-token-0001-abcdef"), Some("fastnetmon"));
        assert_eq!(t.holder("s3cr3t-token-0002-abcdef"), Some("portal"));
        assert_eq!(t.holder("s3cr3t-token-0003-abcdef"), None);
        assert_eq!(t.holder(""), None);
        for (text, want) in [
            ("x", ":1: expected `NAME TOKEN`"),
            ("x short", ":1: the token of \"x\" is 5 characters"),
            (
                "a 0123456789abcdef\na 0123456789abcdeX",
                ":2: \"a\" is listed twice",
            ),
            (
                "a 0123456789abcdef\nb 0123456789abcdef",
                ":2: the token of \"b\" is also",
            ),
            ("a 0123456789abcdef extra", ":1: expected"),
        ] {
            let e = Tokens::parse(text, p).err().unwrap().to_string();
            assert!(e.starts_with("/etc/dots-client/api-tokens"), "{e}");
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
