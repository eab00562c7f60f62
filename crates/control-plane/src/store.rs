//! The versioned resources the control plane serves.

use std::collections::BTreeMap;

use crate::Any;

/// One resource and the version it last changed at.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) version: String,
    pub(crate) any: Any,
}

/// The resources of one type.
#[derive(Debug, Default)]
pub(crate) struct TypeStore {
    pub(crate) version: String,
    /// `version` as a number: the store version of the type's last change.
    pub(crate) seq: u64,
    pub(crate) resources: BTreeMap<String, Entry>,
    /// The names each change added, changed or removed, by store version: a Delta stream
    /// answers a push from these rather than by comparing everything held.
    pub(crate) changes: BTreeMap<u64, Vec<String>>,
}

/// Every type's resources; each change is a new version, counted over all types.
#[derive(Debug, Default)]
pub(crate) struct Store {
    last_version: u64,
    types: BTreeMap<String, TypeStore>,
}

impl Store {
    fn bump(&mut self, type_url: &str) -> (String, &mut TypeStore) {
        self.last_version += 1;
        let version = self.last_version.to_string();
        let store = self.types.entry(type_url.to_owned()).or_default();
        store.version = version.clone();
        store.seq = self.last_version;
        (version, store)
    }

    pub(crate) fn upsert(&mut self, type_url: &str, resources: Vec<(String, Any)>) -> String {
        let (version, store) = self.bump(type_url);
        let mut changed = Vec::with_capacity(resources.len());
        for (name, any) in resources {
            let entry = Entry {
                version: version.clone(),
                any,
            };
            store.resources.insert(name.clone(), entry);
            changed.push(name);
        }
        store.changes.insert(store.seq, changed);
        version
    }

    pub(crate) fn replace(&mut self, type_url: &str, resources: Vec<(String, Any)>) -> String {
        let (version, store) = self.bump(type_url);
        let mut old = std::mem::take(&mut store.resources);
        let mut changed = Vec::new();
        for (name, any) in resources {
            let entry = match old.remove(&name) {
                Some(entry) if entry.any == any => entry,
                _ => {
                    changed.push(name.clone());
                    Entry {
                        version: version.clone(),
                        any,
                    }
                }
            };
            store.resources.insert(name, entry);
        }
        changed.extend(old.into_keys());
        store.changes.insert(store.seq, changed);
        version
    }

    pub(crate) fn remove(&mut self, type_url: &str, names: &[&str]) -> String {
        let (version, store) = self.bump(type_url);
        for name in names {
            store.resources.remove(*name);
        }
        let removed = names.iter().map(|n| (*n).to_owned()).collect();
        store.changes.insert(store.seq, removed);
        version
    }

    pub(crate) fn version(&self, type_url: &str) -> String {
        self.types
            .get(type_url)
            .map(|t| t.version.clone())
            .unwrap_or_default()
    }

    pub(crate) fn get(&self, type_url: &str) -> Option<&TypeStore> {
        self.types.get(type_url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(value: &[u8]) -> Any {
        Any {
            type_url: "t".into(),
            value: value.to_vec(),
        }
    }

    #[test]
    fn replace_keeps_the_version_of_what_did_not_change() {
        let mut store = Store::default();
        store.upsert("t", vec![("a".into(), any(b"1")), ("b".into(), any(b"1"))]);
        let v = store.replace("t", vec![("a".into(), any(b"1")), ("c".into(), any(b"2"))]);
        let t = store.get("t").unwrap();
        assert_eq!(t.version, v);
        assert_eq!(t.resources["a"].version, "1");
        assert_eq!(t.resources["c"].version, v);
        assert!(!t.resources.contains_key("b"));
        // The replacement's change names what it added and removed, not what it kept.
        assert_eq!(t.changes[&t.seq], ["c", "b"]);
        assert_eq!(t.changes[&1], ["a", "b"]);
    }

    #[test]
    fn every_change_is_a_new_version() {
        let mut store = Store::default();
        let a = store.upsert("t", vec![("a".into(), any(b"1"))]);
        let b = store.remove("u", &["x"]);
        let c = store.remove("t", &["a"]);
        assert_eq!((a.as_str(), b.as_str(), c.as_str()), ("1", "2", "3"));
        assert_eq!(store.version("u"), "2");
        assert!(store.get("t").unwrap().resources.is_empty());
    }
}
