//! Runs a flow on an existing Ray cluster, through Ray Client and through the GCS address.
//!
//! With `RAY_ADDRESS` set (and `RAY_AUTH_TOKEN`, for a cluster with token authentication),
//! it connects there. Without, it starts a throwaway two-node cluster with `ray start` on
//! 127.0.0.1, uses it, and ends it.
//!
//! `cargo run -p prefect-ray --example existing_cluster`

use prefect::{flow, task};
use prefect_ray::RayTaskRunner;
use prefect_ray::testing::LocalCluster;

#[task]
fn where_am_i(step: u32) -> String {
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default();
    format!("step {step} ran in pid {} from {exe}", std::process::id())
}

#[flow(task_runner = RayTaskRunner::new().address(&address).auth_token(&token))]
fn report(address: String, token: String) -> Vec<String> {
    where_am_i.map(0..3).iter().map(|f| f.result().unwrap()).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (_cluster, addresses, token) = match std::env::var("RAY_ADDRESS") {
        Ok(address) => (None, vec![address], std::env::var("RAY_AUTH_TOKEN").unwrap_or_default()),
        Err(_) => {
            let cluster = LocalCluster::builder().num_cpus(2).start()?;
            let addresses = vec![cluster.client_address().to_owned(), cluster.gcs_address().to_owned()];
            let token = cluster.auth_token().to_owned();
            (Some(cluster), addresses, token)
        }
    };
    for address in addresses {
        println!("-- through {address}");
        for line in report(address, token.clone())? {
            println!("{line}");
        }
    }
    Ok(())
}
