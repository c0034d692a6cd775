//! Framing: length-prefixed MessagePack frames (the bridge's configuration and replies), and
//! frames of byte strings ("parts": calls and replies between a trampoline and its
//! executor).

use std::io::{self, Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Writes one frame: a little-endian `u32` length, then the body.
pub(crate) fn write_frame(out: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let length = u32::try_from(body.len()).map_err(|_| io::Error::other("a message over 4 GiB"))?;
    out.write_all(&length.to_le_bytes())?;
    out.write_all(body)
}

/// Writes one frame whose body is `message` in MessagePack, records as maps with named
/// keys: how the bridge's configuration goes. (Its later commands are a plain MessagePack
/// stream, records as arrays.)
pub(crate) fn write_message_named<T: Serialize + ?Sized>(out: &mut impl Write, message: &T) -> io::Result<()> {
    write_frame(out, &rmp_serde::to_vec_named(message).map_err(io::Error::other)?)
}

/// Reads one MessagePack frame; `None` at a clean end of the stream.
pub(crate) fn read_message<T: DeserializeOwned>(input: &mut impl Read) -> io::Result<Option<T>> {
    let mut length = [0u8; 4];
    match input.read_exact(&mut length) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let mut body = vec![0u8; u32::from_le_bytes(length) as usize];
    input.read_exact(&mut body)?;
    rmp_serde::from_slice(&body).map(Some).map_err(io::Error::other)
}

/// Writes byte strings as one frame: a `u32` count, a `u64` length each, then the bytes.
/// Each part is given as slices that are written one after the other, so a part made of a
/// tag and a large value needs no copy to join them.
pub(crate) fn write_parts(out: &mut impl Write, parts: &[&[&[u8]]]) -> io::Result<()> {
    let mut header = Vec::with_capacity(4 + 8 * parts.len());
    header.extend_from_slice(&(parts.len() as u32).to_le_bytes());
    for part in parts {
        let length: usize = part.iter().map(|slice| slice.len()).sum();
        header.extend_from_slice(&(length as u64).to_le_bytes());
    }
    out.write_all(&header)?;
    for slice in parts.iter().flat_map(|part| part.iter()) {
        out.write_all(slice)?;
    }
    out.flush()
}

/// Reads a frame written by [`write_parts`]; `None` at a clean end of the stream.
pub(crate) fn read_parts(input: &mut impl Read) -> io::Result<Option<Vec<Vec<u8>>>> {
    let mut count = [0u8; 4];
    match input.read_exact(&mut count) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let count = u32::from_le_bytes(count) as usize;
    let mut lengths = vec![0u8; 8 * count];
    input.read_exact(&mut lengths)?;
    lengths
        .chunks_exact(8)
        .map(|length| {
            let mut part = vec![0u8; u64::from_le_bytes(length.try_into().expect("8 bytes")) as usize];
            input.read_exact(&mut part)?;
            Ok(part)
        })
        .collect::<io::Result<Vec<_>>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip_and_end_cleanly() {
        let mut buffer = Vec::new();
        write_parts(&mut buffer, &[&[b"header"], &[], &[&[7u8; 600], &[7u8; 400]]]).unwrap();
        let mut reader = buffer.as_slice();
        let parts = read_parts(&mut reader).unwrap().unwrap();
        assert_eq!(parts, vec![b"header".to_vec(), Vec::new(), vec![7u8; 1000]]);
        assert!(read_parts(&mut reader).unwrap().is_none());
    }

    #[test]
    fn messages_round_trip_and_a_cut_frame_is_an_error() {
        let mut buffer = Vec::new();
        write_frame(&mut buffer, &rmp_serde::to_vec(&("submit", 7u64, vec![1u64, 2])).unwrap()).unwrap();
        let (name, key, deps): (String, u64, Vec<u64>) = read_message(&mut buffer.as_slice()).unwrap().unwrap();
        assert_eq!((name.as_str(), key, deps), ("submit", 7, vec![1, 2]));
        let cut = &buffer[..buffer.len() - 1];
        assert!(read_message::<(String, u64, Vec<u64>)>(&mut &cut[..]).is_err());
    }
}
