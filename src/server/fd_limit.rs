//! The open files that `server.max_connections` needs.
//!
//! Every connection is a file descriptor, and so are the listeners, the archive's files, each
//! NTP poll's UDP socket and an HSM's sessions. A process usually starts with a soft limit of
//! 1,024 (`RLIMIT_NOFILE`), far below the default 4,096 connections: past it `accept` fails
//! with `EMFILE`, no client gets the clean 503 of a full server, and the clock's polls and the
//! archive's writes fail at the same moment. So at start-up the soft limit is raised as far as
//! `max_connections` plus [`RESERVE`] need, up to the hard limit; where the hard limit leaves
//! less room, the connection limit in force is lowered to fit, with a warning, so that the
//! 503 comes before the process runs out of descriptors (`LimitNOFILE=` in the systemd unit
//! raises the hard limit).

/// Descriptors kept for everything but the public connections.
pub const RESERVE: u64 = 256;

/// What to do with the limits found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The soft limit to run with (the current one where it is enough).
    pub soft: u64,
    /// The connection limit in force: `max_connections`, or less where the hard limit leaves
    /// less room (at least 1).
    pub connections: usize,
}

/// The soft limit and connection limit for `max_connections` under the limits `soft` and
/// `hard` (`u64::MAX`: unlimited). The soft limit is raised only as far as needed, and never
/// lowered.
pub fn plan(soft: u64, hard: u64, max_connections: usize) -> Plan {
    let wanted = (max_connections as u64).saturating_add(RESERVE);
    let soft = soft.max(wanted.min(hard));
    let room = soft.saturating_sub(RESERVE);
    Plan {
        soft,
        connections: usize::try_from(room)
            .unwrap_or(usize::MAX)
            .min(max_connections)
            .max(1),
    }
}

/// Raises the soft `RLIMIT_NOFILE` for `max_connections` (see the module's documentation)
/// and returns the connection limit to enforce.
pub fn fit(max_connections: usize) -> usize {
    let Some((soft, hard)) = nofile() else {
        return max_connections;
    };
    let mut planned = plan(soft, hard, max_connections);
    if planned.soft > soft {
        let raised = libc::rlimit {
            rlim_cur: planned.soft,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the struct it is given, which lives across the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::info!(
                from = soft,
                to = planned.soft,
                "open file limit raised for max_connections"
            );
        } else {
            let error = std::io::Error::last_os_error();
            tracing::warn!(%error, "cannot raise the open file limit");
            planned = plan(soft, soft, max_connections);
        }
    }
    if planned.connections < max_connections {
        tracing::warn!(
            event = "connections_limited",
            max_connections,
            connections = planned.connections,
            open_files = planned.soft,
            reserve = RESERVE,
            "the open file limit leaves room for {} connections, not max_connections = {}: \
             the connection limit is lowered to {} (raise the hard limit, LimitNOFILE= in \
             the systemd unit)",
            planned.connections,
            max_connections,
            planned.connections
        );
    }
    planned.connections
}

/// The current soft and hard `RLIMIT_NOFILE`.
fn nofile() -> Option<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(%error, "cannot read the open file limit");
        return None;
    }
    let value = |v: libc::rlim_t| match v {
        libc::RLIM_INFINITY => u64::MAX,
        v => v,
    };
    Some((value(limit.rlim_cur), value(limit.rlim_max)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_soft_limit_that_is_enough_is_kept() {
        assert_eq!(
            plan(65_536, 65_536, 4096),
            Plan {
                soft: 65_536,
                connections: 4096
            }
        );
    }

    #[test]
    fn the_soft_limit_is_raised_as_far_as_needed() {
        assert_eq!(
            plan(1024, 524_288, 4096),
            Plan {
                soft: 4096 + RESERVE,
                connections: 4096
            }
        );
        assert_eq!(
            plan(1024, u64::MAX, 10_000),
            Plan {
                soft: 10_000 + RESERVE,
                connections: 10_000
            }
        );
    }

    #[test]
    fn a_hard_limit_too_low_lowers_the_connection_limit() {
        assert_eq!(
            plan(1024, 4096, 4096),
            Plan {
                soft: 4096,
                connections: 4096 - RESERVE as usize
            }
        );
        assert_eq!(
            plan(1024, 1024, 4096),
            Plan {
                soft: 1024,
                connections: 1024 - RESERVE as usize
            }
        );
    }

    #[test]
    fn a_hard_limit_below_the_reserve_leaves_one_connection() {
        assert_eq!(
            plan(100, 100, 4096),
            Plan {
                soft: 100,
                connections: 1
            }
        );
    }

    #[test]
    fn the_open_file_limit_is_raised_for_the_connections() {
        // This process's own limits; raising the soft one within the hard one needs no
        // privilege.
        let (_, hard) = nofile().expect("the limits");
        if hard < 2_000 + RESERVE {
            return; // nothing to raise under so low a hard limit
        }
        assert_eq!(fit(2_000), 2_000);
        let (soft, _) = nofile().expect("the limits");
        assert!(soft >= 2_000 + RESERVE, "{soft}");
    }
}
