//! kube-proxy's chain names: `KUBE-SVC-` + the first 16 characters of the base32 (RFC 4648,
//! padded alphabet) encoding of sha256(service port name + protocol); `KUBE-SEP-` hashes the
//! endpoint (`ip:port`) in too. The same names mean `iptables-save` reads as kube-proxy's.
//! [`HashedName`] holds such a name in 11 bytes, for the mirror and the kernel read, which
//! name 110,000 chains at 10,000 Services.

use std::fmt;

use crate::chain::SERVICE_CHAIN_PREFIXES;

/// The base32 alphabet of the names (RFC 4648).
const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// A per-Service chain's name (one of [`SERVICE_CHAIN_PREFIXES`] and 16 base32 characters)
/// without the heap: which prefix, and the 80 bits its characters spell. As a `Box<str>` each
/// name took 64 bytes (the pointer and a 48-byte allocation); held so, 11.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct HashedName {
    prefix: u8,
    bits: [u8; 10],
}

impl HashedName {
    /// `name` held compactly, or `None` if it is not a prefix and 16 base32 characters.
    #[must_use]
    pub(crate) fn parse(name: &str) -> Option<HashedName> {
        let (prefix, hash) = SERVICE_CHAIN_PREFIXES
            .iter()
            .enumerate()
            .find_map(|(i, p)| Some((i, name.strip_prefix(p)?)))?;
        if hash.len() != 16 {
            return None;
        }
        let mut bits: u128 = 0;
        for c in hash.bytes() {
            let v = ALPHABET.iter().position(|&a| a == c)?;
            bits = (bits << 5) | u128::try_from(v).ok()?;
        }
        let bytes = bits.to_be_bytes();
        Some(HashedName {
            prefix: u8::try_from(prefix).ok()?,
            bits: bytes[6..].try_into().ok()?,
        })
    }
}

impl fmt::Display for HashedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut bytes = [0u8; 16];
        bytes[6..].copy_from_slice(&self.bits);
        let bits = u128::from_be_bytes(bytes);
        f.write_str(SERVICE_CHAIN_PREFIXES[usize::from(self.prefix)])?;
        for i in (0..16).rev() {
            let c = ALPHABET[usize::try_from((bits >> (i * 5)) & 31).unwrap_or(0)];
            fmt::Write::write_char(f, char::from(c))?;
        }
        Ok(())
    }
}

impl PartialEq<str> for HashedName {
    fn eq(&self, name: &str) -> bool {
        HashedName::parse(name) == Some(*self)
    }
}

/// The hash part of a chain name: base32(sha256(input))[..16].
#[must_use]
pub fn name_hash(input: &str) -> String {
    // 16 base32 characters carry 80 bits: the first 10 bytes of the digest.
    let digest = sha256(input.as_bytes());
    let mut bits: u128 = 0;
    for b in &digest[..10] {
        bits = (bits << 8) | u128::from(*b);
    }
    (0..16)
        .rev()
        .map(|i| ALPHABET[usize::try_from((bits >> (i * 5)) & 31).unwrap_or(0)] as char)
        .collect()
}

/// `KUBE-SVC-…` for a service port name (`ns/name:port`) and lowercase protocol.
#[must_use]
pub fn service_chain(port_name: &str, protocol: &str) -> String {
    format!("KUBE-SVC-{}", name_hash(&format!("{port_name}{protocol}")))
}

/// `KUBE-SVL-…`: the Local-policy chain.
#[must_use]
pub fn local_chain(port_name: &str, protocol: &str) -> String {
    format!("KUBE-SVL-{}", name_hash(&format!("{port_name}{protocol}")))
}

/// `KUBE-EXT-…`: the external-destinations chain.
#[must_use]
pub fn external_chain(port_name: &str, protocol: &str) -> String {
    format!("KUBE-EXT-{}", name_hash(&format!("{port_name}{protocol}")))
}

/// `KUBE-FW-…`: the loadBalancerSourceRanges chain.
#[must_use]
pub fn firewall_chain(port_name: &str, protocol: &str) -> String {
    format!("KUBE-FW-{}", name_hash(&format!("{port_name}{protocol}")))
}

/// `KUBE-SEP-…` for one endpoint (`ip:port`, IPv6 as `[ip]:port`).
#[must_use]
pub fn endpoint_chain(port_name: &str, protocol: &str, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        name_hash(&format!("{port_name}{protocol}{endpoint}"))
    )
}

/// SHA-256 (FIPS 180-4). Hand-written to keep the crate's dependencies to what the workspace
/// already builds; only chain names use it, a few hundred bytes per Service.
#[must_use]
#[allow(
    clippy::many_single_char_names,
    clippy::too_many_lines,
    reason = "FIPS 180-4's own names (a..h, w, k) and round constants, kept so it reads against the standard"
)]
pub fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a_2f98,
        0x7137_4491,
        0xb5c0_fbcf,
        0xe9b5_dba5,
        0x3956_c25b,
        0x59f1_11f1,
        0x923f_82a4,
        0xab1c_5ed5,
        0xd807_aa98,
        0x1283_5b01,
        0x2431_85be,
        0x550c_7dc3,
        0x72be_5d74,
        0x80de_b1fe,
        0x9bdc_06a7,
        0xc19b_f174,
        0xe49b_69c1,
        0xefbe_4786,
        0x0fc1_9dc6,
        0x240c_a1cc,
        0x2de9_2c6f,
        0x4a74_84aa,
        0x5cb0_a9dc,
        0x76f9_88da,
        0x983e_5152,
        0xa831_c66d,
        0xb003_27c8,
        0xbf59_7fc7,
        0xc6e0_0bf3,
        0xd5a7_9147,
        0x06ca_6351,
        0x1429_2967,
        0x27b7_0a85,
        0x2e1b_2138,
        0x4d2c_6dfc,
        0x5338_0d13,
        0x650a_7354,
        0x766a_0abb,
        0x81c2_c92e,
        0x9272_2c85,
        0xa2bf_e8a1,
        0xa81a_664b,
        0xc24b_8b70,
        0xc76c_51a3,
        0xd192_e819,
        0xd699_0624,
        0xf40e_3585,
        0x106a_a070,
        0x19a4_c116,
        0x1e37_6c08,
        0x2748_774c,
        0x34b0_bcb5,
        0x391c_0cb3,
        0x4ed8_aa4a,
        0x5b9c_ca4f,
        0x682e_6ff3,
        0x748f_82ee,
        0x78a5_636f,
        0x84c8_7814,
        0x8cc7_0208,
        0x90be_fffa,
        0xa450_6ceb,
        0xbef9_a3f7,
        0xc671_78f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09_e667,
        0xbb67_ae85,
        0x3c6e_f372,
        0xa54f_f53a,
        0x510e_527f,
        0x9b05_688c,
        0x1f83_d9ab,
        0x5be0_cd19,
    ];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks_exact(64) {
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
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
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

    fn hex(b: &[u8]) -> String {
        b.iter().fold(String::new(), |mut s, x| {
            use std::fmt::Write as _;
            let _ = write!(s, "{x:02x}");
            s
        })
    }

    #[test]
    fn sha256_matches_the_standard_vectors() {
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
    }

    #[test]
    fn hashed_names_hold_every_chain_name_the_proxier_makes() {
        let names = [
            service_chain("default/kubernetes:https", "tcp"),
            local_chain("ns/web", "udp"),
            external_chain("ns/web:http", "sctp"),
            firewall_chain("ns/web:http", "tcp"),
            endpoint_chain("ns/web:http", "tcp", "[fd00::1]:8080"),
            "KUBE-XLB-AAAAAAAAAAAAAAAA".into(),
            "KUBE-SVC-7777777777777777".into(),
        ];
        for name in names {
            let held = HashedName::parse(&name).unwrap();
            assert_eq!(held.to_string(), name);
            assert!(held == *name.as_str());
        }
        let other = HashedName::parse("KUBE-SEP-AAAAAAAAAAAAAAAB").unwrap();
        assert_ne!(HashedName::parse("KUBE-SVC-AAAAAAAAAAAAAAAB"), Some(other));
        for not in [
            "KUBE-SERVICES",
            "KUBE-SVC-AAAAAAAAAAAAAAA",
            "KUBE-SVC-AAAAAAAAAAAAAAAAA",
            "KUBE-SVC-AAAAAAAAAAAAAAA1",
            "KUBE-SVC-aAAAAAAAAAAAAAAA",
            "USER-SVC-AAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(HashedName::parse(not), None, "{not}");
        }
    }

    #[test]
    fn chain_names_match_kube_proxys() {
        // Names seen on real clusters: kubernetes' default Services.
        assert_eq!(
            service_chain("default/kubernetes:https", "tcp"),
            "KUBE-SVC-NPX46M4PTMTKRN6Y"
        );
        assert_eq!(
            service_chain("kube-system/kube-dns:dns", "udp"),
            "KUBE-SVC-TCOU7JCQXEZGVUNU"
        );
        assert_eq!(
            service_chain("kube-system/kube-dns:dns-tcp", "tcp"),
            "KUBE-SVC-ERIFXISQEP7F7OF4"
        );
        assert_eq!(
            service_chain("kube-system/kube-dns:metrics", "tcp"),
            "KUBE-SVC-JD5MR3NA4I4DYORP"
        );
    }
}
