//! Shard and session naming, shared by the planner, the router, the controllers and the
//! reflector.
//!
//! A session `room` has shards `room`, `room~1`, `room~2`, …: shard 0 keeps the plain name, so
//! a session that never overflows looks exactly like an unsharded one to its clients. A client
//! joins a shard by passing its name as `name` to `Session.join`; the client sends it to the
//! reflector as `<appId>/<name>`.

/// The character that separates a session's name from its shard number (`room~2`).
pub const SHARD_SEPARATOR: char = '~';

/// Name of shard `index` of session `name`: the plain name for shard 0, `<name>~N` after.
pub fn shard_name(name: &str, index: u32) -> String {
    if index == 0 {
        name.to_owned()
    } else {
        format!("{name}{SHARD_SEPARATOR}{index}")
    }
}

/// Splits a shard name into its session name and shard index (`room~2` → `("room", 2)`).
/// Returns `None` for a name whose suffix after `~` is not a shard number above 0.
pub fn parse_shard_name(shard: &str) -> Option<(&str, u32)> {
    match shard.rsplit_once(SHARD_SEPARATOR) {
        None => Some((shard, 0)),
        Some((name, n)) => match n.parse::<u32>() {
            // Digits only: `u32::from_str` also takes a sign (`room~+2`).
            Ok(i)
                if i > 0
                    && !n.starts_with('0')
                    && n.bytes().all(|b| b.is_ascii_digit())
                    && !name.contains(SHARD_SEPARATOR) =>
            {
                Some((name, i))
            }
            _ => None,
        },
    }
}

/// The shard (Croquet session name) a JOIN `name` addresses, which the client forms as
/// `<appId>/<name>`; `None` when `name` does not start with `<app_id>/`. (Not
/// [`shard_name`], which builds a shard's name from a session name and an index.)
pub fn join_shard<'a>(name: &'a str, app_id: &str) -> Option<&'a str> {
    name.strip_prefix(app_id)?.strip_prefix('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_zero_keeps_the_plain_name_and_later_shards_get_a_tilde_suffix() {
        assert_eq!(shard_name("lobby", 0), "lobby");
        assert_eq!(shard_name("lobby", 3), "lobby~3");
        assert_eq!(parse_shard_name("lobby"), Some(("lobby", 0)));
        assert_eq!(parse_shard_name("lobby~3"), Some(("lobby", 3)));
        assert_eq!(parse_shard_name("lobby~0"), None);
        assert_eq!(parse_shard_name("lobby~03"), None);
        assert_eq!(parse_shard_name("lobby~x"), None);
        assert_eq!(parse_shard_name("a~b~2"), None);
        // Found by the `shard_names` fuzz target: a sign is not part of a shard number.
        assert_eq!(parse_shard_name("lobby~+3"), None);
    }

    #[test]
    fn a_join_name_addresses_a_shard_of_its_own_app_only() {
        assert_eq!(join_shard("com.ex/lobby~2", "com.ex"), Some("lobby~2"));
        assert_eq!(join_shard("com.ex/lobby", "com.other"), None);
        assert_eq!(join_shard("com.exlobby", "com.ex"), None);
    }
}
