//! The HTML stats page. Placeholder rendering until the templated page lands.

use super::Snapshot;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub fn render(s: &Snapshot) -> String {
    let mut rows = String::new();
    for b in &s.backends {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            esc(&b.name),
            esc(&b.address),
            b.role.as_str(),
            b.state,
            b.lag_bytes.map(|l| l.to_string()).unwrap_or_default(),
            esc(b.last_error.as_deref().unwrap_or("")),
        ));
    }
    format!(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=2><title>pglb</title></head>\
         <body><h1>pglb {}</h1><p>primary: {}</p><table><tr><th>name</th><th>address</th><th>role</th><th>state</th><th>lag bytes</th><th>last error</th></tr>\n{}</table></body></html>\n",
        s.version,
        esc(s.primary.as_deref().unwrap_or("none")),
        rows
    )
}
