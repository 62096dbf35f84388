//! Parsers for the `/proc/PID` files attestation reads. They take text, not paths, so the
//! awkward cases (a `)` in a command name, cgroup v1 vs v2) are tested on fixtures.

/// The fields of `/proc/PID/stat` attestation uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stat {
    /// `R`, `S`, `D`, … ; `Z` (zombie) and `X` (dead) mean the process has exited.
    pub state: char,
    pub ppid: i32,
    /// Clock ticks after boot at which the process started. Never changes for a process and
    /// differs between a process and a later one that reuses its pid.
    pub starttime: u64,
    pub comm: String,
}

impl Stat {
    pub fn exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses `pid (comm) state ppid … starttime …` (proc(5)). The command name may hold spaces and
/// parentheses, so the fields start after the *last* `)`.
pub(crate) fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = text.get(close + 1..)?.split_ascii_whitespace().collect();
    // fields[0] is field 3 of proc(5) (state), so field N is fields[N - 3].
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let starttime = fields.get(22 - 3)?.parse().ok()?;
    Some(Stat {
        state,
        ppid,
        starttime,
        comm,
    })
}

/// The fields of `/proc/PID/status` attestation uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Status {
    /// Real, effective, saved and filesystem uid.
    pub uids: Vec<u32>,
    pub groups: Vec<u32>,
}

pub(crate) fn parse_status(text: &str) -> Option<Status> {
    let mut status = Status::default();
    let mut saw_uid = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Uid:") {
            status.uids = parse_ids(rest)?;
            saw_uid = true;
        } else if let Some(rest) = line.strip_prefix("Groups:") {
            status.groups = parse_ids(rest)?;
        }
    }
    saw_uid.then_some(status)
}

fn parse_ids(s: &str) -> Option<Vec<u32>> {
    s.split_ascii_whitespace().map(|n| n.parse().ok()).collect()
}

/// The cgroup path of `/proc/PID/cgroup`: the v2 line (`0::/path`) if there is one, else the v1
/// line of the `name=systemd` hierarchy, which is where systemd keeps units on v1 hosts.
pub(crate) fn parse_cgroup(text: &str) -> Option<String> {
    let mut v1_systemd = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            return Some(path.to_string());
        }
        if controllers.split(',').any(|c| c == "name=systemd") {
            v1_systemd = Some(path.to_string());
        }
    }
    v1_systemd
}

/// The systemd unit a cgroup path names: its last component ending in `.service` or `.scope`.
/// The *last* one, because a service can run inside a user manager (`user@1000.service/…/x.scope`)
/// and its processes can sit in a sub-cgroup of the unit (`nginx.service/workers`).
pub(crate) fn unit_from_cgroup(path: &str) -> Option<String> {
    path.split('/')
        .rfind(|c| {
            [".service", ".scope"]
                .iter()
                .any(|suffix| c.len() > suffix.len() && c.ends_with(suffix))
        })
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_found_after_a_command_name_with_spaces_and_parens() {
        let text = "4242 (evil) R 1 (x) S 77 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 200 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0\n";
        let stat = parse_stat(text).unwrap();
        assert_eq!(stat.comm, "evil) R 1 (x");
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.ppid, 77);
        assert_eq!(stat.starttime, 987654);
        assert!(!stat.exited());
    }

    #[test]
    fn stat_of_our_own_process_parses() {
        let text = std::fs::read_to_string("/proc/self/stat").unwrap();
        let stat = parse_stat(&text).unwrap();
        assert_eq!(stat.ppid, std::os::unix::process::parent_id() as i32);
        assert!(stat.starttime > 0);
    }

    #[test]
    fn truncated_stat_is_refused() {
        assert_eq!(parse_stat("1 (init) S 0 1 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn zombie_and_dead_states_count_as_exited() {
        for s in ['Z', 'X'] {
            let stat = Stat {
                state: s,
                ppid: 1,
                starttime: 1,
                comm: String::new(),
            };
            assert!(stat.exited());
        }
    }

    #[test]
    fn status_gives_uids_and_supplementary_groups() {
        let text =
            "Name:\tphp-fpm\nUid:\t33\t33\t33\t33\nGid:\t33\t33\t33\t33\nGroups:\t33 1001 \n";
        let status = parse_status(text).unwrap();
        assert_eq!(status.uids, vec![33, 33, 33, 33]);
        assert_eq!(status.groups, vec![33, 1001]);
        let empty = parse_status("Uid:\t0\t0\t0\t0\nGroups:\t\n").unwrap();
        assert!(empty.groups.is_empty());
        assert_eq!(parse_status("Name:\tx\n"), None);
    }

    #[test]
    fn cgroup_prefers_the_v2_line_then_v1_name_systemd() {
        let v2 = "0::/system.slice/nginx.service\n";
        assert_eq!(
            parse_cgroup(v2).as_deref(),
            Some("/system.slice/nginx.service")
        );
        let v1 =
            "12:pids:/system.slice/cron.service\n1:name=systemd:/system.slice/php-fpm.service\n";
        assert_eq!(
            parse_cgroup(v1).as_deref(),
            Some("/system.slice/php-fpm.service")
        );
        let hybrid = "1:name=systemd:/system.slice/a.service\n0::/system.slice/b.service\n";
        assert_eq!(
            parse_cgroup(hybrid).as_deref(),
            Some("/system.slice/b.service")
        );
        assert_eq!(parse_cgroup("4:memory:/x\n"), None);
    }

    #[test]
    fn unit_is_the_last_service_or_scope_component() {
        let cases = [
            ("/system.slice/nginx.service", Some("nginx.service")),
            ("/system.slice/nginx.service/workers", Some("nginx.service")),
            (
                "/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.scope",
                Some("app-foo.scope"),
            ),
            (
                "/user.slice/user-1000.slice/session-3.scope",
                Some("session-3.scope"),
            ),
            ("/", None),
            ("/docker/abc123", None),
            ("/x/.service", None),
        ];
        for (path, want) in cases {
            assert_eq!(unit_from_cgroup(path).as_deref(), want, "{path}");
        }
    }
}
