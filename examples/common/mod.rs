//! What the examples share.

use std::path::PathBuf;

/// The relay binary built beside the examples (target/release/outbox-relay).
pub fn relay_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .join("outbox-relay")
}
