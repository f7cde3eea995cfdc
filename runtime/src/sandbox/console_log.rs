//! Reading the guest's console log for error messages.

use std::path::Path;

/// The guest kernel's `Linux version` line from a console log, if it got that far.
pub fn kernel_banner(path: &Path) -> Option<String> {
    let text = String::from_utf8_lossy(&std::fs::read(path).ok()?).into_owned();
    text.lines()
        .find(|l| l.contains("Linux version"))
        .map(|l| l.trim_end().to_string())
}

/// The last `n` lines of a text file, for error messages.
pub fn tail_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).to_string())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(n)..].join("\n");
    if tail.is_empty() {
        format!("({} is empty)", path.display())
    } else {
        tail
    }
}
