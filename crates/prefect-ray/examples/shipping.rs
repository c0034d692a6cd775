//! What shipping this program to an existing cluster costs: the first flow run uploads it
//! (with the worker package), the next finds it there. Measured through Ray Client and
//! through the GCS address, with the program's debug info shipped and without (the
//! default), each on a fresh throwaway cluster on 127.0.0.1 so that nothing is cached.
//!
//! ```text
//! cargo run -p prefect-ray --example shipping
//! CARGO_PROFILE_DEV_DEBUG=true cargo run -p prefect-ray --example shipping   # with full debug info in this workspace's crates
//! ```

use std::time::Instant;

use prefect::{flow, task};
use prefect_ray::RayTaskRunner;
use prefect_ray::testing::LocalCluster;

#[task]
fn one() -> u32 {
    1
}

#[flow(task_runner = RayTaskRunner::new().address(&address).auth_token(&token).ship_debug_info(keep))]
fn ping(address: String, token: String, keep: bool) -> u32 {
    one.submit().result().unwrap()
}

/// The packages that the cluster's nodes unpacked (Ray names each by its content's hash):
/// one after two runs means the second run found the program on the cluster.
fn packages(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            match (name.starts_with("_ray_pkg_"), is_dir) {
                (true, true) => 1,
                (false, true) => packages(&entry.path()),
                _ => 0,
            }
        })
        .sum()
}

/// The size of `file` deflated, about what it adds to the zip that Ray uploads.
fn deflated(file: &std::path::Path) -> u64 {
    std::process::Command::new("gzip").arg("-6c").arg(file).output().map_or(0, |output| output.stdout.len() as u64)
}

fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let whole = std::fs::metadata(&exe)?.len();
    let dir = tempfile::tempdir()?;
    let stripped_path = dir.path().join("stripped");
    let stripped = std::process::Command::new("objcopy")
        .arg("--strip-debug")
        .arg(&exe)
        .arg(&stripped_path)
        .status()
        .is_ok_and(|status| status.success());
    let shipped = if stripped { stripped_path.as_path() } else { exe.as_path() };
    println!(
        "program {:.1} MB ({:.1} MB deflated); without debug info {:.1} MB ({:.1} MB deflated)",
        megabytes(whole),
        megabytes(deflated(&exe)),
        megabytes(std::fs::metadata(shipped)?.len()),
        megabytes(deflated(shipped)),
    );
    println!("| debug info | through | first run (uploads) | second run | packages on the cluster |");
    println!("|---|---|---|---|---|");
    for keep in [true, false] {
        for client in [true, false] {
            let cluster = LocalCluster::builder().num_cpus(1).start()?;
            let address = if client { cluster.client_address() } else { cluster.gcs_address() }.to_owned();
            let token = cluster.auth_token().to_owned();
            let mut times = Vec::new();
            for _ in 0..2 {
                let start = Instant::now();
                assert_eq!(ping(address.clone(), token.clone(), keep)?, 1);
                times.push(start.elapsed().as_secs_f64());
            }
            let (what, through) = (if keep { "shipped" } else { "stripped" }, if client { "ray://" } else { "GCS" });
            let unpacked = packages(cluster.dir());
            println!("| {what} | {through} | {:.2} s | {:.2} s | {unpacked} |", times[0], times[1]);
        }
    }
    Ok(())
}
