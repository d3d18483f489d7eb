//! Human-friendly sizes for command lines, shared by the client and the node.

/// Parses a byte size: a plain number, or one with a binary suffix
/// (`K`, `M`, `G`, `T`, optionally followed by `iB` or `B`): `4M` is 4 MiB.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(digits_end);
    let number: u64 = digits.parse().map_err(|err: std::num::ParseIntError| {
        if *err.kind() == std::num::IntErrorKind::PosOverflow {
            format!("'{text}' is too large")
        } else {
            format!("'{text}' is not a size (examples: 4096, 64K, 4M, 1G)")
        }
    })?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("'{text}' has an unknown size suffix '{suffix}'")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("4X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        for huge in ["99999999999999999999T", "18446744073709551616", "16777216T"] {
            assert_eq!(parse_size(huge), Err(format!("'{huge}' is too large")));
        }
    }
}
