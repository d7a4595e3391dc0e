//! `Settings`: what the promoter needs from `lb.toml`, resolved once per (re)load: the members
//! (backends with priority and `no_failover`), the login used for its own checks and actions
//! (secrets read now), the replication credentials written into `primary_conninfo`, and the
//! timings. Parsing and validating the file stays in `config`.

use std::time::Duration;

use crate::backend::probe::{self, ProbeError};
use crate::config::{BackendConfig, Config, Secret};
use crate::tls::ClientTls;

/// One configured backend as the promoter sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// `host:port`, as in the config: the promoter connects there, and re-pointed replicas put
    /// it in their `primary_conninfo`.
    pub address: String,
    /// Tie-breaker among equally advanced replicas: higher wins. Default 100.
    pub priority: u32,
    /// Never promoted.
    pub no_failover: bool,
}

impl Member {
    pub fn from_config(b: &BackendConfig) -> Member {
        Member {
            name: b.name.clone(),
            address: b.address.clone(),
            priority: b.priority,
            no_failover: b.no_failover,
        }
    }

    /// The physical slot this member uses on its primary: the name in lower case with
    /// anything but `[a-z0-9_]` turned into `_` (`pg-1` → `pg_1`).
    pub fn slot_name(&self) -> String {
        slot_name(&self.name)
    }
}

/// See [`Member::slot_name`].
pub fn slot_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect()
}

/// How the promoter logs in to every server, for its looks and its steps: its own user and
/// password (`[promoter] user`, `password_env`/`password_file`), the database from `[check]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Login {
    pub user: String,
    pub password: Option<Secret>,
    pub database: String,
    /// Bound on connecting (and, for a look, on the whole look): half of `failover_after`,
    /// kept between 1 s and 5 s.
    pub timeout: Duration,
    /// `[promoter]`'s sslmode, sslrootcert, sslcert and sslkey.
    pub tls: ClientTls,
}

impl Login {
    /// A fresh session on `address` (`host:port`) as `application_name`. The connection task
    /// ends when the client is dropped.
    pub async fn connect(
        &self,
        address: &str,
        application_name: &str,
    ) -> Result<tokio_postgres::Client, ProbeError> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.user(&self.user)
            .dbname(&self.database)
            .application_name(application_name);
        if let Some(pw) = &self.password {
            cfg.password(pw.expose());
        }
        probe::connect(
            address,
            &cfg,
            &self.tls,
            self.timeout,
            self.password.is_some(),
        )
        .await
    }
}

/// Why the promoter cannot run with a config.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{path}: no [promoter] section: pglb-promoter needs one (see docs/failover.md)")]
    NoPromoterSection { path: String },
    /// `at` is "file:line: key `promoter.password_env`" (where the secret is named).
    #[error("{at}: {message}")]
    Secret { at: String, message: String },
    #[error("{path}: promoter.pglb_url {url:?}: only http://host:port[/] is supported")]
    PglbUrl { path: String, url: String },
    /// pglb protects `/stats.json` and the credential the promoter would send cannot be read.
    #[error("{path}: {key}: {message} (the promoter reads pglb's /stats.json with it)")]
    PglbSecret {
        path: String,
        key: &'static str,
        message: String,
    },
}

/// The promoter's resolved settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub members: Vec<Member>,
    /// Login for looks and steps.
    pub login: Login,
    pub replication_user: String,
    pub replication_password: Option<Secret>,
    /// How long no primary may answer before a failover (witnesses agreeing). Default 3 s.
    pub failover_after: Duration,
    pub synchronous: bool,
    /// Time between two looks at the cluster. Default 500 ms.
    pub interval: Duration,
    /// pglb stats endpoints (`host:port`, path `/stats.json`): each a witness when reachable.
    /// Never empty: `pglb_url` when set, else `listen.stats` on localhost.
    pub pglb_stats: Vec<String>,
    /// `Authorization` header for it when pglb's `[stats]` protects reading: its read token,
    /// else its admin token, else Basic with its read user.
    pub pglb_authorization: Option<Secret>,
    /// Where the promoter serves `/status`, `/metrics` and `/health`.
    pub listen: String,
}

impl Settings {
    /// Reads the `[promoter]` section and resolves its secrets now.
    pub fn from_config(c: &Config) -> Result<Settings, SettingsError> {
        let path = c.path.display().to_string();
        let p = c
            .promoter
            .as_ref()
            .ok_or_else(|| SettingsError::NoPromoterSection { path: path.clone() })?;
        let secret = |src: &Option<crate::config::SecretSource>, i: usize, key: &str| {
            src.as_ref()
                .map(|s| {
                    s.resolve().map_err(|message| SettingsError::Secret {
                        at: p.secrets_at[i]
                            .clone()
                            .unwrap_or_else(|| format!("{path}: promoter.{key}")),
                        message,
                    })
                })
                .transpose()
        };
        let password = secret(&p.password, 0, "password")?;
        let replication_password = secret(&p.replication_password, 1, "replication_password")?;
        let pglb_stats = if p.pglb_url.is_empty() {
            // pglb listens on listen.stats; an unspecified address means this host.
            let mut a = c.listen.stats;
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            vec![a.to_string()]
        } else {
            p.pglb_url
                .iter()
                .map(|url| {
                    parse_http_url(url).ok_or_else(|| SettingsError::PglbUrl {
                        path: path.clone(),
                        url: url.clone(),
                    })
                })
                .collect::<Result<_, _>>()?
        };
        // pglb's read credential, in pglb's order: read token, admin token, Basic read user.
        // The file is read with secrets optional (pglb's check password is not ours), so one
        // named but unreadable here is an error now rather than a witness that answers 401.
        let pglb_authorization = {
            use base64::Engine;
            let st = &c.stats;
            let unreadable =
                |key: &'static str, src: &crate::config::SecretSource| SettingsError::PglbSecret {
                    path: path.clone(),
                    key,
                    message: src.resolve().err().unwrap_or_else(|| "not readable".into()),
                };
            let bearer = |t: &Secret| Secret::new(format!("Bearer {}", t.expose()));
            if let Some(src) = &st.read_token_source {
                Some(bearer(
                    st.read_token
                        .as_ref()
                        .ok_or_else(|| unreadable("stats.read_token", src))?,
                ))
            } else if let Some(src) = &st.admin_token_source {
                Some(bearer(
                    st.admin_token
                        .as_ref()
                        .ok_or_else(|| unreadable("stats.admin_token", src))?,
                ))
            } else if let Some(src) = &st.read_password_source {
                let (user, pw) = st
                    .read_basic
                    .as_ref()
                    .ok_or_else(|| unreadable("stats.read_password", src))?;
                let raw = format!("{user}:{}", pw.expose());
                Some(Secret::new(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw)
                )))
            } else {
                None
            }
        };
        Ok(Settings {
            members: c.backends.iter().map(Member::from_config).collect(),
            login: Login {
                user: p.user.clone(),
                password,
                database: c.check.database.clone(),
                timeout: probe_timeout(p.failover_after),
                tls: p.tls.clone(),
            },
            replication_user: p.replication_user.clone(),
            replication_password,
            failover_after: p.failover_after,
            synchronous: p.synchronous,
            interval: p.interval,
            pglb_stats,
            pglb_authorization,
            listen: p.listen.clone(),
        })
    }

    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    /// Bound on one look at one server (connect, login, queries): half of `failover_after`,
    /// kept between 1 s and 5 s, so a hung server counts as gone before the deadline while a
    /// merely slow login on a busy host does not.
    pub fn probe_timeout(&self) -> Duration {
        self.login.timeout
    }
}

fn probe_timeout(failover_after: Duration) -> Duration {
    (failover_after / 2).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// `http://host:port[/...]` → `host:port` (port 80 when absent).
pub fn parse_http_url(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    if hostport.is_empty() {
        return None;
    }
    if hostport.ends_with(']') {
        return Some(format!("{hostport}:80"));
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) => (!h.is_empty() && p.parse::<u16>().is_ok()).then(|| hostport.to_string()),
        None => Some(format!("{hostport}:80")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secrets;
    use std::path::Path;

    #[test]
    fn slot_names_follow_postgres_rules() {
        assert_eq!(slot_name("pg-1"), "pg_1");
        assert_eq!(slot_name("Replica.East"), "replica_east");
    }

    #[test]
    fn pglb_url_forms() {
        assert_eq!(
            parse_http_url("http://127.0.0.1:8404").as_deref(),
            Some("127.0.0.1:8404")
        );
        assert_eq!(
            parse_http_url("http://lb:8404/stats.json").as_deref(),
            Some("lb:8404")
        );
        assert_eq!(parse_http_url("http://lb").as_deref(), Some("lb:80"));
        assert_eq!(parse_http_url("https://lb:8404"), None);
        assert_eq!(parse_http_url("http://lb:port"), None);
    }

    const CFG: &str = r#"
[listen]
stats = "0.0.0.0:9404"
[check]
user = "pglb_check"
[promoter]
user = "postgres"
failover_after = "3s"
[[backend]]
name = "pg-0"
address = "127.0.0.1:5432"
[[backend]]
name = "pg-1"
address = "127.0.0.1:5433"
priority = 150
no_failover = true
"#;

    #[test]
    fn settings_from_config() {
        let c = Config::parse(Path::new("lb.toml"), CFG).unwrap();
        let s = Settings::from_config(&c).unwrap();
        assert_eq!(s.members.len(), 2);
        assert_eq!(s.members[1].priority, 150);
        assert!(s.members[1].no_failover);
        assert_eq!(s.pglb_stats, ["127.0.0.1:9404"]);
        assert_eq!(s.probe_timeout(), Duration::from_millis(1500));
        assert_eq!(s.login.user, "postgres");
        assert_eq!(s.listen, "0.0.0.0:8405");
    }

    #[test]
    fn pglb_read_credentials_are_sent() {
        let c = Config::parse(Path::new("lb.toml"), CFG).unwrap();
        assert!(Settings::from_config(&c)
            .unwrap()
            .pglb_authorization
            .is_none());
        std::env::set_var("PGLB_TEST_PROMOTER_READ_TOKEN", "tok-1");
        let c = Config::parse(
            Path::new("lb.toml"),
            &CFG.replace(
                "[check]",
                "[stats]\nread_token_env = \"PGLB_TEST_PROMOTER_READ_TOKEN\"\n[check]",
            ),
        )
        .unwrap();
        let a = Settings::from_config(&c).unwrap().pglb_authorization;
        assert_eq!(a.unwrap().expose(), "Bearer tok-1");
    }

    #[test]
    fn missing_section_and_secret_are_reported() {
        let c = Config::parse(
            Path::new("lb.toml"),
            &CFG.replace(
                "[promoter]\nuser = \"postgres\"\nfailover_after = \"3s\"\n",
                "",
            ),
        )
        .unwrap();
        let e = Settings::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("no [promoter] section"), "{e}");
        let c = Config::parse(
            Path::new("lb.toml"),
            &CFG.replace(
                "user = \"postgres\"",
                "user = \"postgres\"\npassword_env = \"PGLB_TEST_SURELY_UNSET_PROMOTER_PW\"",
            ),
        )
        .unwrap();
        let e = Settings::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("promoter.password"), "{e}");
        assert!(e.contains("PGLB_TEST_SURELY_UNSET_PROMOTER_PW"), "{e}");
    }

    #[test]
    fn pglb_url_is_a_string_or_a_list() {
        let with = |v: &str| {
            let c = Config::parse(
                Path::new("lb.toml"),
                &CFG.replace("[promoter]", &format!("[promoter]\npglb_url = {v}")),
            )
            .unwrap();
            Settings::from_config(&c).map(|s| s.pglb_stats)
        };
        assert_eq!(with("\"http://a:8404\"").unwrap(), ["a:8404"]);
        assert_eq!(
            with("[\"http://a:8404\", \"http://b:9404/\"]").unwrap(),
            ["a:8404", "b:9404"]
        );
        // Refused where it is written: file, line and key.
        let e = Config::parse(
            Path::new("lb.toml"),
            &CFG.replace(
                "[promoter]",
                "[promoter]\npglb_url = [\"http://a:8404\", \"https://b\"]",
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("key `promoter.pglb_url`: \"https://b\"") && e.starts_with("lb.toml:"),
            "{e}"
        );
        assert!(Config::parse(
            Path::new("lb.toml"),
            &CFG.replace("[promoter]", "[promoter]\npglb_url = 3")
        )
        .is_err());
    }

    #[test]
    fn the_check_password_is_not_the_promoters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.toml");
        std::fs::write(
            &path,
            CFG.replace(
                "user = \"pglb_check\"",
                "user = \"pglb_check\"\npassword_env = \"PGLB_TEST_SURELY_UNSET_CHECK_PW\"",
            ),
        )
        .unwrap();
        assert!(Config::load(&path).is_err(), "pglb needs it");
        let c = Config::load_with(&path, Secrets::Optional).unwrap();
        assert!(c.check.password.is_none());
        let s = Settings::from_config(&c).unwrap();
        assert_eq!(s.login.user, "postgres");
        assert_eq!(s.login.password, None);
    }

    #[test]
    fn pglb_read_credentials_named_but_unreadable_are_an_error() {
        let c = Config::parse_with(
            Path::new("lb.toml"),
            &CFG.replace(
                "[check]",
                "[stats]\nread_token_env = \"PGLB_TEST_SURELY_UNSET_READ_TOKEN\"\n[check]",
            ),
            Secrets::Optional,
        )
        .unwrap();
        let e = Settings::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("stats.read_token"), "{e}");
        assert!(e.contains("PGLB_TEST_SURELY_UNSET_READ_TOKEN"), "{e}");
    }
}
