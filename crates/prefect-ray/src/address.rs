//! A cluster's address, checked before a bridge is started for it: a malformed address is
//! refused at once, and one where nothing listens within a second or two, instead of after
//! Ray's own retries (15 s for a GCS address, 90 s through Ray Client).

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::RayError;

/// What to write instead of a bad address.
const FORMS: &str = "write host:port for the cluster's GCS (ray start prints it), ray://host:port for Ray Client, or give no address for a temporary local instance";

/// An address the runner can try: where to knock first, if it names a host and a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Address {
    /// The host and port to probe; `None` for `auto`, which Ray resolves itself.
    pub(crate) target: Option<(String, u16)>,
}

/// Checks an address's form: `host:port`, `ray://host:port` or `auto` (also as
/// `ray://auto`).
pub(crate) fn parse(address: &str) -> Result<Address, RayError> {
    let invalid = |reason: String| RayError::InvalidAddress { address: address.to_owned(), reason };
    if address.trim().is_empty() {
        return Err(invalid(format!("the address is empty; {FORMS}")));
    }
    let rest = address.strip_prefix("ray://").unwrap_or(address);
    if rest == "auto" {
        return Ok(Address { target: None });
    }
    if rest.is_empty() {
        return Err(invalid(format!("the address names no host; {FORMS}")));
    }
    if rest.contains("://") || rest.contains('/') {
        return Err(invalid(format!("only ray:// addresses (or none) are understood; {FORMS}")));
    }
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(invalid(format!("the address names no port; {FORMS}")));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(invalid(format!("the address names no host; {FORMS}")));
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok(Address { target: Some((host.to_owned(), port)) }),
        _ => Err(invalid(format!("{port:?} is not a port number (1 to 65535); {FORMS}"))),
    }
}

/// Whether something accepts connections at the address: fails within about `wait` when
/// the port is closed or the host does not answer.
pub(crate) fn probe(address: &str, parsed: &Address, wait: Duration) -> Result<(), RayError> {
    let Some((host, port)) = &parsed.target else { return Ok(()) };
    let unreachable = |message: String| RayError::Unreachable { address: address.to_owned(), message };
    let resolved: Vec<SocketAddr> = (host.as_str(), *port)
        .to_socket_addrs()
        .map_err(|error| unreachable(format!("the host {host} is unknown ({error}); check the address")))?
        .collect();
    let deadline = Instant::now() + wait;
    loop {
        let mut last = None;
        for socket in &resolved {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
            match TcpStream::connect_timeout(socket, left) {
                Ok(_) => return Ok(()),
                Err(error) => last = Some(error),
            }
        }
        // A cluster that was just started may not listen yet: knock again until the wait
        // is over.
        if Instant::now() >= deadline {
            let why = last.map_or("no address to connect to".to_owned(), |error| error.to_string());
            return Err(unreachable(format!(
                "nothing answers at {host}:{port} ({why}); check that the cluster is running and the address is right"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(address: &str) -> String {
        match parse(address) {
            Err(RayError::InvalidAddress { reason, .. }) => reason,
            other => panic!("{address:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn good_addresses_name_what_to_probe() {
        let target = |host: &str, port| Address { target: Some((host.to_owned(), port)) };
        assert_eq!(parse("127.0.0.1:6379").unwrap(), target("127.0.0.1", 6379));
        assert_eq!(parse("ray://head:10001").unwrap(), target("head", 10001));
        assert_eq!(parse("[::1]:6379").unwrap(), target("::1", 6379));
        assert_eq!(parse("auto").unwrap(), Address { target: None });
        assert_eq!(parse("ray://auto").unwrap(), Address { target: None });
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        assert!(reason("").starts_with("the address is empty"));
        assert!(reason("  ").starts_with("the address is empty"));
        assert!(reason("ray://").starts_with("the address names no host"));
        assert!(reason("ray://:10001").starts_with("the address names no host"));
        assert!(reason("head").starts_with("the address names no port"));
        assert!(reason("head:x").starts_with("\"x\" is not a port number"));
        assert!(reason("head:0").starts_with("\"0\" is not a port number"));
        assert!(reason("http://head:8265").starts_with("only ray:// addresses"));
        assert!(reason("").ends_with("or give no address for a temporary local instance"));
    }

    #[test]
    fn a_closed_port_is_unreachable_once_the_wait_is_over() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let address = closed.to_string();
        let started = Instant::now();
        let error = probe(&address, &parse(&address).unwrap(), Duration::from_millis(300)).unwrap_err();
        assert!(matches!(error, RayError::Unreachable { .. }), "{error:?}");
        assert!(error.to_string().contains("nothing answers at 127.0.0.1"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[test]
    fn an_open_port_answers() {
        let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("ray://{}", open.local_addr().unwrap());
        probe(&address, &parse(&address).unwrap(), Duration::from_secs(1)).unwrap();
    }
}
