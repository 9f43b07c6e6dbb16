//! Rebuilds the crate when a migration changes: `sqlx::migrate!` embeds them, and on
//! stable Rust it cannot tell cargo to watch the folder itself.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
