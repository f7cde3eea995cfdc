//! Container id validation (runc's rules).

use crate::error::RuntimeError;

/// Checks `id` against runc's charset `^[\w+\-.]+$`, also refusing `.` and `..` (they would
/// name the state root itself or its parent).
pub fn validate(id: &str) -> Result<(), RuntimeError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.');
    if id.is_empty() || id == "." || id == ".." || !id.chars().all(ok_char) || id.len() > 1024 {
        return Err(RuntimeError::InvalidId(id.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn accepts_runc_charset() {
        for id in ["a", "abc-DEF_1.2+3", &"f".repeat(64)] {
            assert!(validate(id).is_ok(), "{id}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for id in ["", ".", "..", "a/b", "a b", "é", "x;y", "../etc"] {
            assert!(validate(id).is_err(), "{id:?}");
        }
    }
}
