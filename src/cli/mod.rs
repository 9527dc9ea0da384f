//! The `tsa` command line: each subcommand in its own module.

pub mod archive;
pub mod check;
pub mod client;
pub mod clock;
pub mod hsm;
pub mod init;
pub mod inspect;
pub mod request;
pub mod serve;
pub mod verify;

/// Times `signatures` signatures (rounded up to a multiple of `threads`) by `signer` on
/// `threads` threads at once: how many were made, and in what time.
pub fn time_signatures(
    signer: &std::sync::Arc<dyn tsa::signer::Signer>,
    signatures: usize,
    threads: usize,
) -> anyhow::Result<(usize, std::time::Duration)> {
    let threads = threads.max(1);
    let per_thread = signatures.div_ceil(threads);
    let message = b"tsa check: a timed signature";
    let start = std::time::Instant::now();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(move || -> anyhow::Result<()> {
                    for _ in 0..per_thread {
                        signer.sign(message)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("a signing thread panicked"))
    })?;
    Ok((per_thread * threads, start.elapsed()))
}

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
