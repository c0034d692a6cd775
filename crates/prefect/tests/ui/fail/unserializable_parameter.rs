struct Connection;

#[prefect::task]
fn query(connection: Connection) -> u32 {
    let _ = connection;
    1
}

fn main() {}
