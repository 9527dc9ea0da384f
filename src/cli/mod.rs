//! The `tsa` command line: each subcommand in its own module.

pub mod archive;
pub mod client;
pub mod clock;
pub mod hsm;
pub mod init;
pub mod inspect;
pub mod request;
pub mod serve;
pub mod verify;

/// `path`, where nothing is there or `force` allows replacing it; else an error that says so.
pub fn not_replacing(path: &std::path::Path, force: bool) -> anyhow::Result<&std::path::Path> {
    if !force && path.symlink_metadata().is_ok() {
        anyhow::bail!(
            "{} exists already: not replaced; remove it, or give --force",
            path.display()
        );
    }
    Ok(path)
}

/// Hex digits (spaces and colons allowed) to bytes.
pub fn hex_decode(text: &str) -> anyhow::Result<Vec<u8>> {
    let digits: Vec<u8> = text.bytes().filter(|b| !matches!(b, b' ' | b':')).collect();
    // `from_str_radix` alone would take a sign ("+a").
    if !digits.iter().all(u8::is_ascii_hexdigit) {
        anyhow::bail!("'{text}' is not hex");
    }
    if digits.len() % 2 != 0 {
        anyhow::bail!("odd number of hex digits");
    }
    digits
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| anyhow::anyhow!("'{text}' is not hex"))
        })
        .collect()
}
