//! Development tool for guests: reads a `NetworkConfig` as JSON from the file named by its
//! argument and applies it to the current network namespace. Usage: `netapply CONFIG.json`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: netapply CONFIG.json")?;
    let config: rootcell_net::NetworkConfig =
        serde_json::from_str(&std::fs::read_to_string(path)?)?;
    rootcell_net::apply(&config)?;
    println!(
        "netapply: applied {} interfaces, {} routes",
        config.interfaces.len(),
        config.routes.len()
    );
    Ok(())
}
