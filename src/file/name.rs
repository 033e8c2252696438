//! Key → file name: the documented, stable mapping (see
//! [`FileLocks`](crate::FileLocks#on-disk-format)).
//!
//! - A *simple* key (1 to [`SIMPLE_MAX`] bytes, each an ASCII letter, digit,
//!   `-` or `_`) is the file name `<key>.lock`.
//! - Any other key becomes `~` followed by its UTF-8 bytes, each simple byte
//!   kept and every other byte written `%XX` (two upper-case hex digits), then
//!   `.lock`. A simple key never starts with `~` and `~`, `/`, `.` and NUL
//!   are always encoded, so the two forms never meet and no name leaves the
//!   directory.
//! - A name whose stem (the part before `.lock`) would exceed [`STEM_MAX`]
//!   bytes is `~~` followed by the 64 lower-case hex digits of the SHA-256 of
//!   the key's UTF-8 bytes, then `.lock`. An encoded stem never contains a
//!   second `~` (it is encoded), so hashed names meet no other form; two long
//!   keys that collide in SHA-256 would share a lock, which only
//!   over-excludes.

/// The longest simple key, in bytes.
pub(crate) const SIMPLE_MAX: usize = 100;
/// The longest stem before a name is hashed, in bytes.
pub(crate) const STEM_MAX: usize = 200;
/// The suffix of every lock file.
pub(crate) const SUFFIX: &str = ".lock";

fn is_simple_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// The file name (inside the lock directory) of `key`'s lock file.
pub(crate) fn file_name(key: &str) -> String {
    let bytes = key.as_bytes();
    if (1..=SIMPLE_MAX).contains(&bytes.len()) && bytes.iter().all(|&b| is_simple_byte(b)) {
        let mut name = String::with_capacity(key.len() + SUFFIX.len());
        name.push_str(key);
        name.push_str(SUFFIX);
        return name;
    }
    let encoded_len = 1 + bytes
        .iter()
        .map(|&b| if is_simple_byte(b) { 1 } else { 3 })
        .sum::<usize>();
    if encoded_len > STEM_MAX {
        let mut name = String::with_capacity(2 + 64 + SUFFIX.len());
        name.push_str("~~");
        for byte in sha256(bytes) {
            name.push_str(&format!("{byte:02x}"));
        }
        name.push_str(SUFFIX);
        return name;
    }
    let mut name = String::with_capacity(encoded_len + SUFFIX.len());
    name.push('~');
    for &b in bytes {
        if is_simple_byte(b) {
            name.push(b as char);
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    name.push_str(SUFFIX);
    name
}

/// Whether `name` is a name [`file_name`] produces for some key (what
/// `prune` may touch): exactly, so that other files in the directory, even
/// ones ending in `.lock`, are left alone.
pub(crate) fn is_lock_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(SUFFIX) else {
        return false;
    };
    if let Some(hash) = stem.strip_prefix("~~") {
        return hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    }
    let key = match stem.strip_prefix('~') {
        Some(encoded) => match decode(encoded) {
            Some(key) => key,
            None => return false,
        },
        None => stem.to_owned(),
    };
    // The mapping is a function: a name is one of its outputs exactly when
    // the key it decodes to maps back to it.
    file_name(&key) == name
}

/// The key behind an encoded stem (after its `~`): simple bytes as they
/// are, `%XX` (upper-case hex) as the byte; `None` for anything else or
/// for bytes that are not UTF-8.
fn decode(encoded: &str) -> Option<String> {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    let mut bytes = Vec::with_capacity(encoded.len());
    let mut rest = encoded.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if is_simple_byte(b) {
            bytes.push(b);
            rest = tail;
        } else if let [b'%', high, low, tail @ ..] = rest {
            bytes.push(hex(*high)? << 4 | hex(*low)?);
            rest = tail;
        } else {
            return None;
        }
    }
    String::from_utf8(bytes).ok()
}

/// SHA-256 (FIPS 180-4), for the stable names of over-long keys: the same
/// digest as Python's `hashlib.sha256(key.encode()).hexdigest()`. Not on
/// any hot path (only keys whose encoded name exceeds 200 bytes).
pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((data.len() as u64).wrapping_mul(8)).to_be_bytes());
    for block in message.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, v) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(v);
        }
    }
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: [u8; 32]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sha256_known_vectors() {
        assert_eq!(
            hex(sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
    }

    #[test]
    fn mapping_examples() {
        assert_eq!(file_name("wf-1_A"), "wf-1_A.lock");
        assert_eq!(file_name(""), "~.lock");
        assert_eq!(file_name("."), "~%2E.lock");
        assert_eq!(file_name(".."), "~%2E%2E.lock");
        assert_eq!(file_name("a/b"), "~a%2Fb.lock");
        assert_eq!(file_name("\0"), "~%00.lock");
        assert_eq!(file_name("~"), "~%7E.lock");
        assert_eq!(file_name("é"), "~%C3%A9.lock");
        assert_eq!(
            file_name(&"a".repeat(100)),
            format!("{}.lock", "a".repeat(100))
        );
        assert_eq!(
            file_name(&"a".repeat(101)),
            format!("~{}.lock", "a".repeat(101))
        );
        let long = "a".repeat(300);
        let name = file_name(&long);
        assert!(name.starts_with("~~") && name.len() == 2 + 64 + 5, "{name}");
        for key in ["", ".", "..", "a/b", "\0", "é", "x.lock", "~~ab"] {
            let name = file_name(key);
            assert!(is_lock_name(&name), "{name}");
            assert!(!name.contains('/') && name != "." && name != "..");
        }
        assert!(!is_lock_name("notes.txt") && !is_lock_name(".lock"));
        // Names the mapping never produces, though they look close: prune
        // must leave them alone.
        for other in [
            "a~b.lock",
            "%.lock",
            "~~x.lock",
            "~a%2f.lock", // lower-case hex
            "~abc.lock",  // a simple key is never encoded
            "~%41.lock",  // 'A' is simple, never written %41
            "~%FF.lock",  // not UTF-8
            "x.lock.lock",
        ] {
            assert!(!is_lock_name(other), "{other}");
        }
        assert!(is_lock_name(&format!("~~{}.lock", "0a".repeat(32))));
    }
}
