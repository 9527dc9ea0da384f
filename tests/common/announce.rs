//! The first line `tsa serve` prints (where it listens), read within a time limit: a server
//! stuck before it announces itself (an HSM login, a database that does not answer) fails its
//! test instead of hanging it.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::time::Duration;

/// How long a start may take before its test fails.
pub const START_LIMIT: Duration = Duration::from_secs(120);

/// `child`'s first line on stdout (empty where it exited without one), read within
/// [`START_LIMIT`]; past it the child is killed and the test fails.
pub fn first_line(child: &mut Child) -> String {
    let stdout = child.stdout.take().expect("stdout piped");
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut first = String::new();
        let _ = BufReader::new(stdout).read_line(&mut first);
        let _ = send.send(first);
    });
    match receive.recv_timeout(START_LIMIT) {
        Ok(first) => first,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tsa serve did not announce itself within {} s",
                START_LIMIT.as_secs()
            );
        }
    }
}
