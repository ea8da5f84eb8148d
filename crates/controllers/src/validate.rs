//! The API server's name rules, for objects that did not come through one (`--manifests`).
//!
//! The rules are apimachinery's (`util/validation`): a DNS-1123 label for namespaces and
//! Service names, a DNS-1123 subdomain for EndpointSlice and Node names, IANA_SVC_NAME for a
//! Service's port names, a DNS-1123 label for an EndpointSlice's port names, and a label value
//! for the `kubernetes.io/service-name` label. Service names take the DNS-1123 label rule that
//! the `RelaxedServiceNameValidation` gate allows; without the gate the API server also wants
//! a leading letter, which is stricter than any name here needs to be safe.
//!
//! A name that breaks a rule rejects its whole object: the error names the object, the field
//! and the rule, with the value quoted so that it cannot break the log line it is printed in.

use crate::convert::SERVICE_NAME_LABEL;
use crate::source::Object;

/// The longest DNS-1123 label (and label value).
pub const LABEL_MAX: usize = 63;
/// The longest DNS-1123 subdomain.
pub const SUBDOMAIN_MAX: usize = 253;
/// The longest IANA service name (a Service's port name).
pub const PORT_NAME_MAX: usize = 15;

fn lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// Why `s` is not a DNS-1123 label: lowercase alphanumerics and `-`, starting and ending
/// with an alphanumeric, at most 63 bytes.
#[must_use]
pub fn dns1123_label(s: &str) -> Option<String> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > LABEL_MAX {
        return Some(format!(
            "must be 1 to {LABEL_MAX} characters (is {})",
            b.len()
        ));
    }
    let shape = b.iter().all(|c| lower_alnum(*c) || *c == b'-')
        && lower_alnum(b[0])
        && lower_alnum(b[b.len() - 1]);
    (!shape).then(|| {
        "must be a DNS-1123 label: lowercase alphanumerics or '-', \
         starting and ending with an alphanumeric"
            .to_owned()
    })
}

/// Why `s` is not a DNS-1123 subdomain: dot-separated parts shaped like labels, at most 253
/// bytes in all (apimachinery does not cap a part at 63).
#[must_use]
pub fn dns1123_subdomain(s: &str) -> Option<String> {
    if s.is_empty() || s.len() > SUBDOMAIN_MAX {
        return Some(format!(
            "must be 1 to {SUBDOMAIN_MAX} characters (is {})",
            s.len()
        ));
    }
    let shape = s.split('.').all(|l| {
        let b = l.as_bytes();
        !b.is_empty()
            && b.iter().all(|c| lower_alnum(*c) || *c == b'-')
            && lower_alnum(b[0])
            && lower_alnum(b[b.len() - 1])
    });
    (!shape).then(|| {
        "must be a DNS-1123 subdomain: lowercase alphanumerics, '-' or '.', \
         each part starting and ending with an alphanumeric"
            .to_owned()
    })
}

/// Why `s` is not an IANA service name (RFC 6335): at most 15 bytes of lowercase
/// alphanumerics and `-`, at least one letter, no `-` at either end or next to another.
#[must_use]
pub fn iana_svc_name(s: &str) -> Option<String> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > PORT_NAME_MAX {
        return Some(format!(
            "must be 1 to {PORT_NAME_MAX} characters (is {})",
            b.len()
        ));
    }
    if !b.iter().all(|c| lower_alnum(*c) || *c == b'-') {
        return Some("must contain only lowercase alphanumerics or '-'".into());
    }
    if !b.iter().any(u8::is_ascii_lowercase) {
        return Some("must contain at least one letter".into());
    }
    if b[0] == b'-' || b[b.len() - 1] == b'-' || s.contains("--") {
        return Some("must not begin or end with '-' or hold '--'".into());
    }
    None
}

/// Why `s` is not a label value: empty, or at most 63 bytes of alphanumerics, `-`, `_` and
/// `.`, starting and ending with an alphanumeric.
#[must_use]
pub fn label_value(s: &str) -> Option<String> {
    let b = s.as_bytes();
    if b.is_empty() {
        return None;
    }
    if b.len() > LABEL_MAX {
        return Some(format!(
            "must be at most {LABEL_MAX} characters (is {})",
            b.len()
        ));
    }
    let shape = b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric();
    (!shape).then(|| {
        "must be a label value: alphanumerics, '-', '_' or '.', \
         starting and ending with an alphanumeric"
            .to_owned()
    })
}

/// Checks the names of `obj` as the API server would; the error names the object and field.
pub fn object(obj: &Object) -> Result<(), String> {
    let (kind, meta) = match obj {
        Object::Service(o) => ("Service", &o.metadata),
        Object::EndpointSlice(o) => ("EndpointSlice", &o.metadata),
        Object::Node(o) => ("Node", &o.metadata),
    };
    let name = meta.name.as_deref().unwrap_or("");
    let namespace = meta.namespace.as_deref().unwrap_or("default");
    let id = if matches!(obj, Object::Node(_)) {
        format!("{kind} {name:?}")
    } else {
        format!("{kind} {:?}", format!("{namespace}/{name}"))
    };
    let fail =
        |field: &str, value: &str, why: String| Err(format!("{id}: {field} {value:?} {why}"));
    if !matches!(obj, Object::Node(_))
        && let Some(why) = dns1123_label(namespace)
    {
        return fail("metadata.namespace", namespace, why);
    }
    let name_rule = match obj {
        Object::Service(_) => dns1123_label,
        Object::EndpointSlice(_) | Object::Node(_) => dns1123_subdomain,
    };
    if let Some(why) = name_rule(name) {
        return fail("metadata.name", name, why);
    }
    match obj {
        Object::Service(svc) => {
            let ports = svc.spec.iter().flat_map(|s| s.ports.iter().flatten());
            for (i, p) in ports.enumerate() {
                if let Some(n) = p.name.as_deref().filter(|n| !n.is_empty())
                    && let Some(why) = iana_svc_name(n)
                {
                    return fail(&format!("spec.ports[{i}].name"), n, why);
                }
            }
        }
        Object::EndpointSlice(slice) => {
            if let Some(v) = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL))
                && let Some(why) = label_value(v)
            {
                return fail(&format!("metadata.labels[{SERVICE_NAME_LABEL}]"), v, why);
            }
            for (i, p) in slice.ports.iter().flatten().enumerate() {
                if let Some(n) = p.name.as_deref().filter(|n| !n.is_empty())
                    && let Some(why) = dns1123_label(n)
                {
                    return fail(&format!("ports[{i}].name"), n, why);
                }
            }
        }
        Object::Node(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_dns_1123() {
        for ok in ["a", "web", "0ab", "a-b", &"a".repeat(63)] {
            assert_eq!(dns1123_label(ok), None, "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a.b",
            "a_b",
            "a\nb",
            "a b",
            &"a".repeat(64),
        ] {
            assert!(dns1123_label(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn subdomains_are_dotted_labels_up_to_253() {
        let long = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert_eq!(long.len(), 253);
        for ok in ["a", "web-abcde", "a.b.c", "0.1", long.as_str()] {
            assert_eq!(dns1123_subdomain(ok), None, "{ok}");
        }
        let too_long = format!("{long}e");
        for bad in [
            "",
            ".a",
            "a.",
            "a..b",
            "a.-b",
            "A",
            "a\n",
            too_long.as_str(),
        ] {
            assert!(dns1123_subdomain(bad).is_some(), "{bad:?}");
        }
        assert_eq!(
            dns1123_subdomain(&"a".repeat(64)),
            None,
            "parts are not capped"
        );
    }

    #[test]
    fn port_names_follow_iana_svc_name() {
        for ok in ["http", "h2c", "a", "web-80", "x-y-z", "abcdefghijklmno"] {
            assert_eq!(iana_svc_name(ok), None, "{ok}");
        }
        for bad in [
            "",
            "80",
            "1-2",
            "-http",
            "http-",
            "a--b",
            "HTTP",
            "a_b",
            "a.b",
            "a\nb",
            "abcdefghijklmnop",
        ] {
            assert!(iana_svc_name(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn label_values_may_be_empty_and_hold_dots_and_underscores() {
        for ok in ["", "web", "Web_1.a", &"a".repeat(63)] {
            assert_eq!(label_value(ok), None, "{ok}");
        }
        for bad in ["-a", "a.", "a b", "a\nb", &"a".repeat(64)] {
            assert!(label_value(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn multibyte_names_are_refused_without_panicking() {
        for s in ["é", "aé", "éa", "\u{0}", "a\u{200b}b"] {
            assert!(dns1123_label(s).is_some());
            assert!(dns1123_subdomain(s).is_some());
            assert!(iana_svc_name(s).is_some());
            assert!(label_value(s).is_some());
        }
    }
}
