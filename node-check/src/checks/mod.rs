//! The conformance checks, by section of docs/protocol.md.

mod framing;
mod handshake;
mod inquiry;
mod replication;
mod requests;
mod sessions;

use crate::ctx::{Ctx, Outcome};

/// One check: the section of the specification it tests, what it checks,
/// and how.
pub struct Check {
    pub section: &'static str,
    pub name: &'static str,
    pub run: fn(&Ctx) -> Outcome,
}

impl Check {
    pub const fn new(section: &'static str, name: &'static str, run: fn(&Ctx) -> Outcome) -> Check {
        Check { section, name, run }
    }
}

/// Every check, in the order of the specification's sections.
pub fn all() -> Vec<&'static Check> {
    let mut all: Vec<&'static Check> = [
        framing::CHECKS,
        handshake::CHECKS,
        requests::CHECKS,
        sessions::CHECKS,
        replication::CHECKS,
        inquiry::CHECKS,
    ]
    .into_iter()
    .flatten()
    .collect();
    all.sort_by_key(|c| section_key(c.section));
    all
}

/// "6.10" sorts after "6.9".
fn section_key(section: &str) -> Vec<u32> {
    section
        .split('.')
        .map(|p| p.parse().unwrap_or(u32::MAX))
        .collect()
}

/// Whether `section` is within `only` ("6" takes 6.x, "6.1" takes 6.1 and
/// not 6.10).
pub fn selected(section: &str, only: &str) -> bool {
    section == only || section.starts_with(&format!("{only}."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_sort_by_number_and_select_by_prefix() {
        let sections: Vec<&str> = all().iter().map(|c| c.section).collect();
        let mut sorted = sections.clone();
        sorted.sort_by_key(|s| section_key(s));
        assert_eq!(sections, sorted);
        assert!(selected("6.10", "6"));
        assert!(selected("6.1", "6.1"));
        assert!(!selected("6.10", "6.1"));
        assert!(!selected("16.1", "6"));
    }
}
