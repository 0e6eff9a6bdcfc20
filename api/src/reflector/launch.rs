//! How other programs launch a reflector and recognise that it started: the typed
//! [`LaunchSpec`] they fill in (rendered as `refleet-reflector`'s own flags or environment
//! variables) and the start-up banner it prints on stdout ([`banner`], [`parse_banner`]).
//!
//! The flag and variable names are not written out here: they are read from clap's
//! description of [`Config`], so a launcher cannot drift from what the reflector parses.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

use clap::{Arg, CommandFactory as _, Parser as _};

use super::config::Config;

/// What starts the reflector's one stdout line: `box: <public base URL>`, what to pass to
/// `Session.join({ box })`. Launchers wait for it to know the reflector accepts connections.
pub const BANNER_PREFIX: &str = "box:";

/// The start-up line announcing `public_url`.
pub fn banner(public_url: &str) -> String {
    format!("{BANNER_PREFIX} {public_url}")
}

/// The public URL of a start-up line, or `None` for any other line.
pub fn parse_banner(line: &str) -> Option<&str> {
    line.trim().strip_prefix(BANNER_PREFIX).map(str::trim)
}

/// A setting a launcher gives the reflector: one field of [`Config`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Setting {
    /// `Config::listen`.
    Listen,
    /// `Config::region`.
    Region,
    /// `Config::reflector_name`.
    ReflectorName,
    /// `Config::public_url`.
    PublicUrl,
    /// `Config::files_url`.
    FilesUrl,
    /// `Config::storage`.
    Storage,
    /// `Config::drain_timeout`.
    DrainTimeout,
    /// `Config::report_url`.
    ReportUrl,
    /// `Config::report_interval`.
    ReportInterval,
    /// `Config::require_join_token`.
    RequireJoinToken,
    /// `Config::token_keys`.
    TokenKeys,
    /// `Config::report_token` (a credential: environment only).
    ReportToken,
    /// `Config::report_token_file` (preferred by the reflector over `ReportToken`).
    ReportTokenFile,
}

impl Setting {
    /// Every setting, in the order [`LaunchSpec`] renders them.
    pub const ALL: [Setting; 13] = [
        Setting::Listen,
        Setting::Region,
        Setting::ReflectorName,
        Setting::PublicUrl,
        Setting::FilesUrl,
        Setting::Storage,
        Setting::DrainTimeout,
        Setting::ReportUrl,
        Setting::ReportInterval,
        Setting::RequireJoinToken,
        Setting::TokenKeys,
        Setting::ReportToken,
        Setting::ReportTokenFile,
    ];

    /// Clap's id of the argument: the name of the [`Config`] field.
    fn id(self) -> &'static str {
        match self {
            Setting::Listen => "listen",
            Setting::Region => "region",
            Setting::ReflectorName => "reflector_name",
            Setting::PublicUrl => "public_url",
            Setting::FilesUrl => "files_url",
            Setting::Storage => "storage",
            Setting::DrainTimeout => "drain_timeout",
            Setting::ReportUrl => "report_url",
            Setting::ReportInterval => "report_interval",
            Setting::RequireJoinToken => "require_join_token",
            Setting::TokenKeys => "token_keys",
            Setting::ReportToken => "report_token",
            Setting::ReportTokenFile => "report_token_file",
        }
    }

    fn names(self) -> &'static Names {
        // `ALL` lists the variants in declaration order (a test checks).
        &NAMES[self as usize]
    }

    /// Its command-line flag, e.g. `--listen`.
    pub fn flag(self) -> &'static str {
        &self.names().flag
    }

    /// Its environment variable, e.g. `REFLEET_LISTEN`.
    pub fn env(self) -> &'static str {
        &self.names().env
    }

    /// Whether the flag takes a value (false for a switch such as `--require-join-token`).
    fn takes_value(self) -> bool {
        self.names().takes_value
    }
}

/// A setting's names, as clap knows them.
struct Names {
    flag: String,
    env: String,
    takes_value: bool,
}

/// The names of every [`Setting`], in [`Setting::ALL`]'s order, read from [`Config`]'s clap
/// description. A setting `Config` lacks is a programming error that the tests catch.
static NAMES: LazyLock<Vec<Names>> = LazyLock::new(|| {
    let command = Config::command();
    Setting::ALL
        .iter()
        .map(|s| {
            #[allow(clippy::expect_used)]
            let arg: &Arg = command
                .get_arguments()
                .find(|a| a.get_id() == s.id())
                .expect("every launch setting is a Config argument");
            Names {
                flag: format!("--{}", arg.get_long().unwrap_or_default()),
                env: arg
                    .get_env()
                    .and_then(OsStr::to_str)
                    .unwrap_or_default()
                    .to_owned(),
                takes_value: arg.get_action().takes_values(),
            }
        })
        .collect()
});

/// How to launch one reflector: the settings its launcher (the operator's pod builder,
/// `refleet up`, tests) gives it; `None` leaves the reflector's default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaunchSpec {
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--region`.
    pub region: Option<String>,
    /// `--reflector-name`.
    pub reflector_name: Option<String>,
    /// `--public-url`.
    pub public_url: Option<String>,
    /// `--files-url`.
    pub files_url: Option<String>,
    /// `--storage`.
    pub storage: Option<String>,
    /// `--drain-timeout`.
    pub drain_timeout: Option<Duration>,
    /// `--report-url`.
    pub report_url: Option<String>,
    /// `--report-interval`.
    pub report_interval: Option<Duration>,
    /// `--require-join-token`.
    pub require_join_token: bool,
    /// `--token-keys`.
    pub token_keys: Option<String>,
    /// The report credential. Only ever in the environment ([`LaunchSpec::to_env`]):
    /// [`LaunchSpec::to_args`] leaves it out, as any user can read a command line.
    pub report_token: Option<String>,
    /// Further arguments, verbatim, after the others (command line only).
    pub extra_args: Vec<String>,
}

impl LaunchSpec {
    /// The settings given, with their values, in [`Setting::ALL`]'s order.
    fn values(&self) -> Vec<(Setting, String)> {
        let text = |v: &Option<String>| v.clone();
        let duration = |d: &Option<Duration>| d.map(duration_value);
        [
            (Setting::Listen, self.listen.map(|a| a.to_string())),
            (Setting::Region, text(&self.region)),
            (Setting::ReflectorName, text(&self.reflector_name)),
            (Setting::PublicUrl, text(&self.public_url)),
            (Setting::FilesUrl, text(&self.files_url)),
            (Setting::Storage, text(&self.storage)),
            (Setting::DrainTimeout, duration(&self.drain_timeout)),
            (Setting::ReportUrl, text(&self.report_url)),
            (Setting::ReportInterval, duration(&self.report_interval)),
            (
                Setting::RequireJoinToken,
                self.require_join_token.then(|| "true".to_owned()),
            ),
            (Setting::TokenKeys, text(&self.token_keys)),
            (Setting::ReportToken, text(&self.report_token)),
        ]
        .into_iter()
        .filter_map(|(s, v)| v.map(|v| (s, v)))
        .collect()
    }

    /// The command line (without the program name): each setting given as its flag, then
    /// [`LaunchSpec::extra_args`]. The report credential is left out (see
    /// [`LaunchSpec::report_token`]).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (setting, value) in self.values() {
            if setting == Setting::ReportToken {
                continue;
            }
            args.push(setting.flag().to_owned());
            if setting.takes_value() {
                args.push(value);
            }
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// The environment: each setting given as its variable (`REFLEET_…`), the credential
    /// included. [`LaunchSpec::extra_args`] have no variables and are left out.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        self.values()
            .into_iter()
            .map(|(setting, value)| (setting.env(), value))
            .collect()
    }
}

/// A duration as the reflector's flags take it: whole seconds as `300s`, anything finer in
/// humantime's notation.
fn duration_value(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        humantime::format_duration(d).to_string()
    }
}

/// Parses `vars` (name, value) the way the reflector reads its environment, without touching
/// this process's own: every `REFLEET_…` variable must be one of [`Config`]'s, and its value
/// must parse. Other variables (`AWS_…`, `RUST_LOG`) are ignored. For checks of what a
/// launcher sets, such as a pod's environment.
pub fn config_from_env<'a>(
    vars: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Config, String> {
    let command = Config::command();
    let mut args = vec!["refleet-reflector".to_owned()];
    for (name, value) in vars {
        let arg = command
            .get_arguments()
            .find(|a| a.get_env().and_then(OsStr::to_str) == Some(name));
        match arg {
            Some(arg) => {
                let flag = format!("--{}", arg.get_long().unwrap_or_default());
                if arg.get_action().takes_values() {
                    args.push(format!("{flag}={value}"));
                } else if !matches!(
                    value.to_ascii_lowercase().as_str(),
                    "" | "n" | "no" | "f" | "false" | "off" | "0"
                ) {
                    // A switch, read like clap reads its variable: set unless falsey.
                    args.push(flag);
                }
            }
            None if name.starts_with("REFLEET_") => {
                return Err(format!("refleet-reflector does not read {name}"));
            }
            None => {}
        }
    }
    Config::try_parse_from(&args).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn every_setting() -> LaunchSpec {
        LaunchSpec {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            region: Some("eu".into()),
            reflector_name: Some("arena-eu-0".into()),
            public_url: Some("ws://arena-eu-0.eu.games.test/".into()),
            files_url: Some("https://files.games.test/arena".into()),
            storage: Some("s3://bucket/prefix".into()),
            drain_timeout: Some(Duration::from_secs(300)),
            report_url: Some("http://refleet-report.refleet-system.svc:8081".into()),
            report_interval: Some(Duration::from_millis(1500)),
            require_join_token: true,
            token_keys: Some("k1=AAAA".into()),
            report_token: Some("arena-eu-0.eu.mac".into()),
            extra_args: vec!["--rate-limit".into(), "50".into()],
        }
    }

    /// What `config` says about each field of `spec` (defaults where `spec` sets none).
    fn assert_config_has(config: &Config, spec: &LaunchSpec) {
        let defaults = Config::parse_from(["refleet-reflector"]);
        let or = |v: &Option<String>, d: &String| v.clone().unwrap_or_else(|| d.clone());
        assert_eq!(config.listen, spec.listen.unwrap_or(defaults.listen));
        assert_eq!(config.region, or(&spec.region, &defaults.region));
        assert_eq!(
            config.reflector_name,
            or(&spec.reflector_name, &defaults.reflector_name)
        );
        assert_eq!(config.public_url, spec.public_url);
        assert_eq!(config.files_url, spec.files_url);
        assert_eq!(config.storage, or(&spec.storage, &defaults.storage));
        assert_eq!(
            Duration::from(config.drain_timeout),
            spec.drain_timeout.unwrap_or(defaults.drain_timeout.into())
        );
        assert_eq!(config.report_url, spec.report_url);
        assert_eq!(
            Duration::from(config.report_interval),
            spec.report_interval
                .unwrap_or(defaults.report_interval.into())
        );
        assert_eq!(config.require_join_token, spec.require_join_token);
        assert_eq!(
            config.token_keys,
            or(&spec.token_keys, &defaults.token_keys)
        );
        assert_eq!(config.report_token_file, None);
    }

    #[test]
    fn every_setting_is_a_config_argument_with_a_flag_and_a_variable() {
        for (i, s) in Setting::ALL.into_iter().enumerate() {
            assert_eq!(s as usize, i, "Setting::ALL is in declaration order");
            assert!(s.flag().len() > 2 && s.flag().starts_with("--"), "{s:?}");
            assert!(s.env().starts_with("REFLEET_"), "{s:?}");
        }
        assert_eq!(Setting::Listen.flag(), "--listen");
        assert_eq!(Setting::ReportToken.env(), "REFLEET_REPORT_TOKEN");
        assert!(!Setting::RequireJoinToken.takes_value());
    }

    #[test]
    fn args_round_trip_through_the_reflectors_own_parser() {
        for spec in [every_setting(), LaunchSpec::default()] {
            let args = spec.to_args();
            let config =
                Config::try_parse_from(std::iter::once("refleet-reflector".to_owned()).chain(args))
                    .unwrap();
            assert_config_has(&config, &spec);
            // The credential never goes on the command line.
            assert_eq!(config.report_token, None);
        }
        let config = Config::try_parse_from(
            std::iter::once("refleet-reflector".to_owned()).chain(every_setting().to_args()),
        )
        .unwrap();
        assert_eq!(config.rate_limit, 50, "extra arguments come through");
    }

    #[test]
    fn env_round_trips_through_the_reflectors_own_parser() {
        for spec in [every_setting(), LaunchSpec::default()] {
            let env = spec.to_env();
            let config = config_from_env(env.iter().map(|(n, v)| (*n, v.as_str()))).unwrap();
            assert_config_has(&config, &spec);
            assert_eq!(config.report_token, spec.report_token);
        }
    }

    #[test]
    fn whole_seconds_are_written_as_seconds() {
        let spec = LaunchSpec {
            drain_timeout: Some(Duration::from_secs(300)),
            report_interval: Some(Duration::from_millis(1500)),
            ..LaunchSpec::default()
        };
        assert_eq!(
            spec.to_env(),
            [
                ("REFLEET_DRAIN_TIMEOUT", "300s".to_owned()),
                ("REFLEET_REPORT_INTERVAL", "1s 500ms".to_owned())
            ]
        );
    }

    #[test]
    fn unknown_reflector_variables_are_refused_and_others_ignored() {
        assert!(config_from_env([("REFLEET_NO_SUCH_THING", "1")]).is_err());
        assert!(config_from_env([("REFLEET_RATE_LIMIT", "many")]).is_err());
        let c =
            config_from_env([("AWS_REGION", "eu-west-1"), ("REFLEET_RATE_LIMIT", "7")]).unwrap();
        assert_eq!(c.rate_limit, 7);
    }

    #[test]
    fn the_banner_is_what_launchers_parse() {
        let line = banner("http://127.0.0.1:7070/");
        assert_eq!(line, "box: http://127.0.0.1:7070/");
        assert_eq!(parse_banner(&line), Some("http://127.0.0.1:7070/"));
        assert_eq!(parse_banner("  box:http://h/ \r"), Some("http://h/"));
        assert_eq!(parse_banner("refleet-reflector ready"), None);
    }
}
