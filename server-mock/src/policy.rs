//! Which clients may open, resize and delete which volumes
//! (`--policy FILE`, read again when the file changes).
//!
//! One rule a line, `IDENTITY VOLUMES OPERATIONS`; `#` starts a comment:
//! - `IDENTITY`: a pattern matched against a certificate's identity
//!   (`*` stands for any run of characters), or `-` alone for plaintext
//!   clients, which have none (a pattern never matches them);
//! - `VOLUMES`: a pattern matched against the volume name;
//! - `OPERATIONS`: `open`, `resize`, `delete`, comma-separated, or `all`.
//!   `open` is the handshake, which may create the volume.
//!
//! An operation is allowed when any rule matching the client and the
//! volume lists it; everything else is refused (an empty policy refuses
//! all). Without a policy file every client may do everything.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::peer::Peer;

/// What a client asks to do to a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Open,
    Resize,
    Delete,
}

impl Op {
    const ALL: [Op; 3] = [Op::Open, Op::Resize, Op::Delete];

    fn name(self) -> &'static str {
        match self {
            Op::Open => "open",
            Op::Resize => "resize",
            Op::Delete => "delete",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    /// `-`: plaintext clients.
    Anonymous,
    /// A pattern over certificate identities.
    Certified(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    who: Who,
    volumes: String,
    /// [`Op::bit`]s.
    ops: u8,
}

/// The rules of a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// Reads and parses the file at `path` (for `Reloading`).
    pub fn load(path: &PathBuf) -> Result<Arc<Policy>, String> {
        const MAX_LEN: u64 = 1 << 20;
        let len = std::fs::metadata(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        if len > MAX_LEN {
            return Err(format!(
                "{}: {len} bytes, a policy may have at most {MAX_LEN}",
                path.display()
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Policy::parse(&text)
            .map(Arc::new)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses a policy's text; an error names the line.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let mut rules = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split_once('#').map_or(line, |(rule, _)| rule);
            let fields: Vec<&str> = line.split_whitespace().collect();
            let rule = match fields[..] {
                [] => continue,
                [who, volumes, ops] => Rule {
                    who: match who {
                        "-" => Who::Anonymous,
                        pattern => Who::Certified(pattern.to_owned()),
                    },
                    volumes: volumes.to_owned(),
                    ops: parse_ops(ops).map_err(|e| format!("line {}: {e}", n + 1))?,
                },
                _ => {
                    return Err(format!(
                        "line {}: expected IDENTITY VOLUMES OPERATIONS, got {} field(s)",
                        n + 1,
                        fields.len()
                    ));
                }
            };
            rules.push(rule);
        }
        Ok(Policy { rules })
    }

    /// Whether `peer` may do `op` to `volume`.
    pub fn allows(&self, peer: &Peer, volume: &str, op: Op) -> bool {
        self.rules.iter().any(|rule| {
            let who = match (&rule.who, peer) {
                (Who::Anonymous, Peer::Anonymous) => true,
                (Who::Certified(pattern), Peer::Certified(id)) => matches(pattern, id),
                _ => false,
            };
            who && rule.ops & op.bit() != 0 && matches(&rule.volumes, volume)
        })
    }
}

fn parse_ops(text: &str) -> Result<u8, String> {
    if text == "all" {
        return Ok(Op::ALL.iter().fold(0, |ops, op| ops | op.bit()));
    }
    text.split(',').try_fold(0, |ops, name| {
        Op::ALL
            .iter()
            .find(|op| op.name() == name)
            .map(|op| ops | op.bit())
            .ok_or_else(|| {
                format!(
                    "unknown operation '{name}': use open, resize, delete (comma-separated) or all"
                )
            })
    })
}

/// Whether `text` matches `pattern`, where `*` stands for any run of
/// characters (none included) and every other character for itself.
fn matches(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    // Without a `*`, the one part is the whole text.
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let mut parts: Vec<&str> = parts.collect();
    let Some(last) = parts.pop() else {
        return rest.is_empty();
    };
    for part in parts {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(id: &str) -> Peer {
        Peer::Certified(id.into())
    }

    #[test]
    fn patterns_match_with_stars_only() {
        assert!(matches("db", "db"));
        assert!(!matches("db", "db2"));
        assert!(matches("*", ""));
        assert!(matches("db-*", "db-1"));
        assert!(matches("db-*", "db-"));
        assert!(!matches("db-*", "xdb-1"));
        assert!(matches("*.example", "host.example"));
        assert!(!matches("*.example", "host.example.org"));
        assert!(matches("a*b*c", "abc"));
        assert!(matches("a*b*c", "a-b-b-c"));
        assert!(!matches("a*b*c", "acb"));
        assert!(!matches("ab*ba", "aba"));
    }

    #[test]
    fn a_rule_allows_what_it_lists_for_whom_it_names() {
        let policy = Policy::parse(
            "# who            volumes  what\n\
             host-a.example   db-*     open,resize   # host A's databases\n\
             csi-*            *        all\n\
             -                scratch  open\n",
        )
        .expect("parse");
        let a = cert("host-a.example");
        assert!(policy.allows(&a, "db-1", Op::Open));
        assert!(policy.allows(&a, "db-1", Op::Resize));
        assert!(!policy.allows(&a, "db-1", Op::Delete));
        assert!(!policy.allows(&a, "web", Op::Open));
        assert!(policy.allows(&cert("csi-controller"), "web", Op::Delete));
        assert!(!policy.allows(&cert("host-b.example"), "db-1", Op::Open));
        // `-` is plaintext clients only; a pattern never matches them.
        assert!(policy.allows(&Peer::Anonymous, "scratch", Op::Open));
        assert!(!policy.allows(&Peer::Anonymous, "db-1", Op::Open));
        assert!(!policy.allows(&cert("-"), "scratch", Op::Open));
        // An empty policy refuses everything.
        assert!(
            !Policy::parse("\n# nothing\n")
                .expect("empty")
                .allows(&a, "db-1", Op::Open)
        );
    }

    #[test]
    fn a_bad_line_is_an_error_naming_it() {
        let err = Policy::parse("a b open\nx y open,wipe\n").expect_err("op");
        assert!(err.starts_with("line 2: unknown operation 'wipe'"), "{err}");
        let err = Policy::parse("a b\n").expect_err("fields");
        assert!(
            err.contains("line 1: expected IDENTITY VOLUMES OPERATIONS"),
            "{err}"
        );
    }
}
