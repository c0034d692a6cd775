//! `cargo xtask bench`: our runners side by side with raw Ray and with prefect-ray, in one
//! run, on this machine. Each round runs every case on every system, one after the other;
//! the table shows medians over rounds and ratios, and `bench/results/` keeps them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Map, Value, json};

use crate::{Result, cargo, prefect_server, python, run};

/// How big each case is.
struct Sizes {
    rounds: usize,
    noop: u64,
    noop_prefect_ray: u64,
    tree_leaves: u64,
    chain: u64,
    montecarlo: (u64, u64),
    data_megabytes: u64,
    scale: u64,
}

const QUICK: Sizes = Sizes {
    rounds: 2,
    noop: 1_000,
    noop_prefect_ray: 50,
    tree_leaves: 1_024,
    chain: 500,
    montecarlo: (8, 40_000_000),
    data_megabytes: 100,
    scale: 10_000,
};

const FULL: Sizes = Sizes {
    rounds: 3,
    noop: 2_000,
    noop_prefect_ray: 200,
    tree_leaves: 1_024,
    chain: 500,
    montecarlo: (16, 40_000_000),
    data_megabytes: 100,
    scale: 1_000_000,
};

/// One system's figures of one case, over rounds.
type Samples = BTreeMap<String, Vec<f64>>;

pub fn bench(root: &Path, quick: bool) -> Result {
    let sizes = if quick { QUICK } else { FULL };
    let ray_python = python::ray_venv(root)?;
    let prefect_python = python::prefect_venv(root)?;
    python::install(&prefect_python, &["matplotlib==3.10.7"])?;
    run(cargo().args(["build", "--release", "--quiet", "-p", "prefect-ray-bench"]))?;
    eprintln!("xtask: starting a Prefect server for prefect-ray");
    let server = prefect_server::start(&prefect_python)?;
    let scratch = ScratchDir::new("xtask-bench-")?;
    let systems = Systems {
        ours: root.join("target/release/bench"),
        ray_python,
        prefect_python,
        scripts: root.join("bench/python"),
        api_url: server.api_url().to_owned(),
        prefect_home: scratch.0.clone(),
    };

    let mut samples: BTreeMap<&str, Samples> = BTreeMap::new();
    for round in 1..=sizes.rounds {
        eprintln!("xtask: round {round} of {}", sizes.rounds);
        let n = sizes.noop.to_string();
        record(&mut samples, "noop", "ours", systems.ours(&["noop", &n, "ray"], false)?);
        record(&mut samples, "noop", "ray", systems.ray(&["noop", &n])?);
        record(&mut samples, "noop", "ray_chunked", systems.ray(&["noop_chunked", &n, "64"])?);
        record(&mut samples, "noop", "ours_submit", systems.ours(&["noop", &n, "submit"], false)?);
        record(&mut samples, "noop", "ours_reporting", systems.ours(&["noop", &n, "ray"], true)?);
        let small = sizes.noop_prefect_ray.to_string();
        record(&mut samples, "noop", "prefect_ray", systems.prefect(&["noop", &small])?);
        record(&mut samples, "noop_threads", "ours", systems.ours(&["noop", &n, "threads"], false)?);
        record(&mut samples, "noop_threads", "prefect", systems.prefect(&["noop", &small, "threads"])?);
        let leaves = sizes.tree_leaves.to_string();
        record(&mut samples, "tree", "ours", systems.ours(&["tree", &leaves], false)?);
        record(&mut samples, "tree", "ray", systems.ray(&["tree", &leaves])?);
        let chain = sizes.chain.to_string();
        record(&mut samples, "chain", "ours", systems.ours(&["chain", &chain], false)?);
        record(&mut samples, "chain", "ray", systems.ray(&["chain", &chain])?);
        let (tasks, draws) = (sizes.montecarlo.0.to_string(), sizes.montecarlo.1.to_string());
        record(&mut samples, "montecarlo", "ours", systems.ours(&["montecarlo", &tasks, &draws], false)?);
        record(&mut samples, "montecarlo", "prefect_ray", systems.prefect(&["montecarlo", &tasks, &draws])?);
        let megabytes = sizes.data_megabytes.to_string();
        record(&mut samples, "data", "ours", systems.ours(&["data", &megabytes], false)?);
        record(&mut samples, "data", "ray", systems.ray(&["data", &megabytes])?);
        record(&mut samples, "startup", "ours", systems.ours(&["startup"], false)?);
        record(&mut samples, "startup", "ray", systems.ray(&["startup"])?);
        if round == 1 {
            let n = sizes.scale.to_string();
            record(&mut samples, "scale", "ours", systems.ours(&["scale", &n], false)?);
        }
    }
    drop(server);
    drop(scratch);

    let results = summarize(&samples, &sizes);
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir).map_err(|e| format!("could not create {}: {e}", dir.display()))?;
    let json_path = dir.join("latest.json");
    let text = serde_json::to_string_pretty(&results).expect("JSON values serialize");
    std::fs::write(&json_path, text + "\n").map_err(|e| format!("could not write {}: {e}", json_path.display()))?;
    let table = table(&results, &sizes, quick);
    std::fs::write(dir.join("latest.md"), &table).map_err(|e| format!("could not write latest.md: {e}"))?;
    run(Command::new(&systems.prefect_python)
        .arg(systems.scripts.join("chart.py"))
        .arg(&json_path)
        .arg(dir.join("latest.png")))?;
    println!("{table}");
    Ok(())
}

struct Systems {
    ours: PathBuf,
    ray_python: PathBuf,
    prefect_python: PathBuf,
    scripts: PathBuf,
    api_url: String,
    prefect_home: PathBuf,
}

impl Systems {
    /// Our bench binary; with `report`, reporting to the Prefect server too.
    fn ours(&self, args: &[&str], report: bool) -> Result<Value> {
        let mut command = Command::new(&self.ours);
        command.args(args).env("PREFECT_RAY_PYTHON", &self.ray_python).env("PREFECT_LOGGING_LEVEL", "WARNING");
        if report {
            command.env("PREFECT_API_URL", &self.api_url);
        } else {
            command.env_remove("PREFECT_API_URL");
        }
        json_output(command)
    }

    fn ray(&self, args: &[&str]) -> Result<Value> {
        let mut command = Command::new(&self.ray_python);
        command.arg(self.scripts.join("raw_ray.py")).args(args);
        ray_env(&mut command);
        json_output(command)
    }

    fn prefect(&self, args: &[&str]) -> Result<Value> {
        let mut command = Command::new(&self.prefect_python);
        command
            .arg(self.scripts.join("prefect_ray_cases.py"))
            .args(args)
            .env("PREFECT_API_URL", &self.api_url)
            .env("PREFECT_HOME", &self.prefect_home)
            .env("PREFECT_LOGGING_LEVEL", "WARNING")
            .env("DO_NOT_TRACK", "1")
            .env("PREFECT_SERVER_ANALYTICS_ENABLED", "false");
        ray_env(&mut command);
        json_output(command)
    }
}

/// The settings our runner gives a temporary instance: loopback only, token authentication
/// on (with a token of its own), no usage stats.
fn ray_env(command: &mut Command) {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let token = format!("{nanos:x}{:x}", std::process::id());
    command
        .env("RAY_USAGE_STATS_ENABLED", "0")
        .env("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        .env("RAY_AUTH_MODE", "token")
        .env("RAY_AUTH_TOKEN", token)
        .env("AUTOSCALER_METRIC_PORT", "0")
        .env("DASHBOARD_METRIC_PORT", "0")
        .env_remove("RAY_ADDRESS");
}

fn json_output(mut command: Command) -> Result<Value> {
    let output = command.output().map_err(|e| format!("could not run {command:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().rev().find(|line| line.starts_with('{'));
    match (output.status.success(), last) {
        (true, Some(line)) => {
            serde_json::from_str(line).map_err(|e| format!("{command:?} printed bad JSON ({e}): {line}"))
        }
        _ => Err(format!("{command:?} failed with {}:\n{}", output.status, String::from_utf8_lossy(&output.stderr))),
    }
}

fn record(samples: &mut BTreeMap<&str, Samples>, case: &'static str, system: &str, result: Value) {
    let case = samples.entry(case).or_default();
    for (figure, value) in result.as_object().into_iter().flatten() {
        if let Some(number) = value.as_f64() {
            case.entry(format!("{system}.{figure}")).or_default().push(number);
        }
    }
}

fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[n / 2]),
        n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// One object per case: each system's median figure, and the ratios the targets are about.
fn summarize(samples: &BTreeMap<&str, Samples>, sizes: &Sizes) -> Value {
    let get = |case: &str, key: &str| samples.get(case).and_then(|s| s.get(key)).and_then(|v| median(v));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => json!(a / b),
        _ => Value::Null,
    };
    let mut results = Map::new();
    let (ours, ray, prefect_ray) =
        (get("noop", "ours.tasks_per_s"), get("noop", "ray.tasks_per_s"), get("noop", "prefect_ray.tasks_per_s"));
    results.insert(
        "noop".into(),
        json!({
            "tasks": sizes.noop,
            "prefect_ray_tasks": sizes.noop_prefect_ray,
            "ours_tasks_per_s": ours,
            "ray_tasks_per_s": ray,
            "prefect_ray_tasks_per_s": prefect_ray,
            "ours_reporting_to_prefect_tasks_per_s": get("noop", "ours_reporting.tasks_per_s"),
            "ours_one_submit_per_task_tasks_per_s": get("noop", "ours_submit.tasks_per_s"),
            "ratio_to_ray": ratio(ours, ray),
            "one_submit_per_task_ratio_to_ray": ratio(get("noop", "ours_submit.tasks_per_s"), ray),
            "ratio_to_prefect_ray": ratio(ours, prefect_ray),
            "ray_chunked_by_hand_tasks_per_s": get("noop", "ray_chunked.tasks_per_s"),
            "ratio_to_ray_chunked_by_hand": ratio(ours, get("noop", "ray_chunked.tasks_per_s")),
        }),
    );
    let (ours, prefect) = (get("noop_threads", "ours.tasks_per_s"), get("noop_threads", "prefect.tasks_per_s"));
    results.insert(
        "noop_threads".into(),
        json!({
            "ours_tasks_per_s": ours,
            "prefect_tasks_per_s": prefect,
            "ratio_to_prefect": ratio(ours, prefect),
        }),
    );
    let (ours, ray) = (get("tree", "ours.seconds"), get("tree", "ray.seconds"));
    results.insert(
        "tree".into(),
        json!({
            "leaves": sizes.tree_leaves,
            "ours_seconds": ours,
            "ray_seconds": ray,
            "time_ratio_to_ray": ratio(ours, ray),
        }),
    );
    let (ours, ray) = (get("chain", "ours.seconds"), get("chain", "ray.seconds"));
    results.insert(
        "chain".into(),
        json!({
            "tasks": sizes.chain,
            "ours_seconds": ours,
            "ray_seconds": ray,
            "time_ratio_to_ray": ratio(ours, ray),
        }),
    );
    let (ours, single, prefect_ray) = (
        get("montecarlo", "ours.seconds"),
        get("montecarlo", "ours.single_thread_seconds"),
        get("montecarlo", "prefect_ray.seconds"),
    );
    results.insert(
        "montecarlo".into(),
        json!({
            "tasks": sizes.montecarlo.0,
            "samples_per_task": sizes.montecarlo.1,
            "ours_seconds": ours,
            "single_thread_seconds": single,
            "prefect_ray_seconds": prefect_ray,
            "speedup_over_one_thread": ratio(single, ours),
            "ratio_to_prefect_ray": ratio(prefect_ray, ours),
        }),
    );
    let (ours, ray) = (get("data", "ours.seconds"), get("data", "ray.seconds"));
    results.insert(
        "data".into(),
        json!({
            "megabytes": sizes.data_megabytes,
            "ours_seconds": ours,
            "ray_seconds": ray,
            "time_ratio_to_ray": ratio(ours, ray),
            "ours_driver_peak_mb": get("data", "ours.driver_peak_mb"),
            "ours_bridge_growth_mb": get("data", "ours.bridge_growth_mb"),
            "ray_driver_peak_mb": get("data", "ray.driver_peak_mb"),
        }),
    );
    let (ours, ray) = (get("startup", "ours.seconds"), get("startup", "ray.seconds"));
    results.insert(
        "startup".into(),
        json!({
            "ours_seconds": ours,
            "ray_seconds": ray,
            "time_ratio_to_ray": ratio(ours, ray),
        }),
    );
    results.insert(
        "scale".into(),
        json!({
            "tasks": sizes.scale,
            "ours_seconds": get("scale", "ours.seconds"),
            "ours_tasks_per_s": get("scale", "ours.tasks_per_s"),
            "ours_driver_peak_mb": get("scale", "ours.driver_peak_mb"),
            "ours_bridge_peak_mb": get("scale", "ours.bridge_peak_mb"),
        }),
    );
    Value::Object(results)
}

fn table(results: &Value, sizes: &Sizes, quick: bool) -> String {
    let f = |case: &str, key: &str| results[case][key].as_f64();
    let show = |value: Option<f64>| {
        value.map_or("–".to_owned(), |v| if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") })
    };
    let times = |value: Option<f64>| value.map_or("–".to_owned(), |v| format!("{v:.2}×"));
    let mut out = String::new();
    out.push_str(&format!(
        "Medians of {} rounds ({}), one machine, 2 CPUs per Ray instance. Ratios: ours against the other system; for rates higher is better, for times lower is better.\n\n",
        sizes.rounds,
        if quick { "cargo xtask bench --quick" } else { "cargo xtask bench" }
    ));
    out.push_str("| case | ours | Ray | prefect-ray / Prefect | vs Ray | vs prefect-ray / Prefect |\n|---|---|---|---|---|---|\n");
    out.push_str(&format!(
        "| no-op tasks per second, map ({} tasks, batched; prefect-ray: {}) | {} | {} | {} | {} | {} |\n",
        sizes.noop,
        sizes.noop_prefect_ray,
        show(f("noop", "ours_tasks_per_s")),
        show(f("noop", "ray_tasks_per_s")),
        show(f("noop", "prefect_ray_tasks_per_s")),
        times(f("noop", "ratio_to_ray")),
        times(f("noop", "ratio_to_prefect_ray"))
    ));
    out.push_str(&format!(
        "| no-op tasks per second, map ({} tasks) against Ray with the map split by hand into tasks of 64 | {} | {} | | {} | |\n",
        sizes.noop,
        show(f("noop", "ours_tasks_per_s")),
        show(f("noop", "ray_chunked_by_hand_tasks_per_s")),
        times(f("noop", "ratio_to_ray_chunked_by_hand"))
    ));
    out.push_str(&format!(
        "| no-op tasks per second, map, reporting to a Prefect server | {} | | | | |\n",
        show(f("noop", "ours_reporting_to_prefect_tasks_per_s"))
    ));
    out.push_str(&format!(
        "| no-op tasks per second, one `submit` per task, in a loop | {} | {} | | {} | |\n",
        show(f("noop", "ours_one_submit_per_task_tasks_per_s")),
        show(f("noop", "ray_tasks_per_s")),
        times(f("noop", "one_submit_per_task_ratio_to_ray"))
    ));
    out.push_str(&format!(
        "| no-op tasks per second, thread pools | {} | | {} | | {} |\n",
        show(f("noop_threads", "ours_tasks_per_s")),
        show(f("noop_threads", "prefect_tasks_per_s")),
        times(f("noop_threads", "ratio_to_prefect"))
    ));
    out.push_str(&format!(
        "| tree reduction, {} leaves (s) | {} | {} | | {} time | |\n",
        sizes.tree_leaves,
        show(f("tree", "ours_seconds")),
        show(f("tree", "ray_seconds")),
        times(f("tree", "time_ratio_to_ray"))
    ));
    out.push_str(&format!(
        "| a chain of {} dependent no-op tasks (s) | {} | {} | | {} time | |\n",
        sizes.chain,
        show(f("chain", "ours_seconds")),
        show(f("chain", "ray_seconds")),
        times(f("chain", "time_ratio_to_ray"))
    ));
    out.push_str(&format!(
        "| Monte Carlo, {} × {} samples (s); one thread: {} s, speedup {} | {} | | {} | | {} faster |\n",
        sizes.montecarlo.0,
        sizes.montecarlo.1,
        show(f("montecarlo", "single_thread_seconds")),
        times(f("montecarlo", "speedup_over_one_thread")),
        show(f("montecarlo", "ours_seconds")),
        show(f("montecarlo", "prefect_ray_seconds")),
        times(f("montecarlo", "ratio_to_prefect_ray"))
    ));
    out.push_str(&format!(
        "| {} MB from task to task (s); driver peak {} MB (Ray's driver: {} MB), bridge +{} MB | {} | {} | | {} time | |\n",
        sizes.data_megabytes,
        show(f("data", "ours_driver_peak_mb")),
        show(f("data", "ray_driver_peak_mb")),
        show(f("data", "ours_bridge_growth_mb")),
        show(f("data", "ours_seconds")),
        show(f("data", "ray_seconds")),
        times(f("data", "time_ratio_to_ray"))
    ));
    out.push_str(&format!(
        "| start and stop a temporary instance (s) | {} | {} | | {} time | |\n",
        show(f("startup", "ours_seconds")),
        show(f("startup", "ray_seconds")),
        times(f("startup", "time_ratio_to_ray"))
    ));
    out.push_str(&format!(
        "| a {}-task map (s), {} tasks/s, driver peak {} MB, bridge peak {} MB | {} | | | | |\n",
        sizes.scale,
        show(f("scale", "ours_tasks_per_s")),
        show(f("scale", "ours_driver_peak_mb")),
        show(f("scale", "ours_bridge_peak_mb")),
        show(f("scale", "ours_seconds"))
    ));
    out
}

/// A directory under the system temp dir, removed when dropped, so a failed run leaves none behind.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(prefix: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{prefix}{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("could not create {}: {e}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
