//! `state`: the OCI state of a container.

use crate::commands::Global;
use anyhow::Result;

/// `state ID`: the OCI state JSON.
pub fn state(g: &Global, id: &str) -> Result<String> {
    let st = g.load(id)?.refreshed();
    Ok(serde_json::to_string_pretty(&st.oci_json())?)
}
