//! `[metrics]`: the address the daemon serves `/metrics` and `/healthz` on, or "off".
//! Without the table it listens on localhost only, so nothing is exposed by default.

use std::net::SocketAddr;

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;
use super::parse::Ctx;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    listen: Option<Spanned<String>>,
}

/// The validated `[metrics]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    /// None: no HTTP endpoint (`listen = "off"`).
    pub listen: Option<std::net::SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
        }
    }
}

pub(super) fn validate(cx: &Ctx, m: Option<&RawMetrics>) -> Result<MetricsConfig, ConfigError> {
    match m.and_then(|m| m.listen.as_ref()) {
        None => Ok(MetricsConfig::default()),
        Some(l) if l.get_ref() == "off" => Ok(MetricsConfig { listen: None }),
        Some(l) => match l.get_ref().parse::<SocketAddr>() {
            Ok(a) => Ok(MetricsConfig { listen: Some(a) }),
            Err(_) => cx.err(
                l.span(),
                "metrics.listen",
                format!(
                    "is \"{}\"; allowed: \"IP:PORT\" (e.g. \"127.0.0.1:9464\") or \"off\"",
                    l.get_ref()
                ),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::parse;

    #[test]
    fn listen_off_default_and_errors() {
        let c = parse(
            "[hotfolder]\nroot = \"hf\"\nwatcher = \"poll\"\n\n[metrics]\nlisten = \"off\"\n",
        )
        .unwrap();
        assert!(c.metrics.listen.is_none());
        assert_eq!(
            parse("").unwrap().metrics.listen.unwrap().to_string(),
            "127.0.0.1:9464"
        );
        let e = parse("\n[metrics]\nlisten = \"nowhere\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("metrics.listen"), "{e}");
    }
}
