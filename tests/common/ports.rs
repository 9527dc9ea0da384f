//! Loopback ports for servers a test must name before they start (HAProxy and its backends,
//! chronyd). They are chosen below the kernel's ephemeral range: a port from that range,
//! free when chosen, can become the source port of any client connection a test beside it
//! opens before the server binds it ("Address already in use").
#![allow(dead_code)]

use std::hash::BuildHasher;
use std::net::{TcpListener, UdpSocket};

/// The lowest port at which this port range begins.
const FLOOR: u16 = 10_000;

/// `N` distinct TCP ports on 127.0.0.1 that were free a moment ago (held together while
/// chosen).
pub fn tcp<const N: usize>() -> [u16; N] {
    pick(|port| TcpListener::bind(("127.0.0.1", port)).ok())
}

/// `N` distinct UDP ports on 127.0.0.1 that were free a moment ago.
pub fn udp<const N: usize>() -> [u16; N] {
    pick(|port| UdpSocket::bind(("127.0.0.1", port)).ok())
}

fn pick<T, const N: usize>(bind: impl Fn(u16) -> Option<T>) -> [u16; N] {
    let ceiling = ephemeral_start();
    assert!(
        ceiling > FLOOR + 1_000,
        "the ephemeral port range starts at {ceiling}: no room below it for test servers"
    );
    let mut state = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..10_000 {
        if ports.len() == N {
            break;
        }
        // xorshift64: a different sequence per call.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let port = FLOOR + (state % u64::from(ceiling - FLOOR)) as u16;
        if ports.contains(&port) {
            continue;
        }
        if let Some(socket) = bind(port) {
            held.push(socket);
            ports.push(port);
        }
    }
    ports
        .try_into()
        .unwrap_or_else(|_| panic!("no {N} free ports between {FLOOR} and {ceiling}"))
}

/// Where the kernel's ephemeral (source) ports begin: `net.ipv4.ip_local_port_range`.
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}
