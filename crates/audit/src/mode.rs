//! The enforcement mode and the layers that set it.

use std::sync::atomic::{AtomicU8, Ordering};

use portcullis_registry::Enforcement;

/// Where the mode in force comes from, strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeSource {
    /// `POST /mode?value=` on the admin port.
    Admin,
    /// The pod's `portcullis.io/mode` annotation (the downward API's annotations file).
    Annotation,
    /// The mesh config's `defaultConfig.proxyMetadata.PORTCULLIS_MODE`.
    MeshConfig,
    /// `--mode` on the command line (or its default).
    Flag,
}

impl ModeSource {
    /// The name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ModeSource::Admin => "admin",
            ModeSource::Annotation => "annotation",
            ModeSource::MeshConfig => "mesh_config",
            ModeSource::Flag => "flag",
        }
    }
}

/// The layers that may set the mode, each switchable at run time without a lock: the
/// data path reads them once per refusal.
#[derive(Debug)]
pub struct ModeSwitch {
    flag: Enforcement,
    annotation: AtomicU8,
    admin: AtomicU8,
}

const UNSET: u8 = 0;
const ENFORCE: u8 = 1;
const AUDIT: u8 = 2;

fn encode(e: Option<Enforcement>) -> u8 {
    match e {
        None => UNSET,
        Some(Enforcement::Enforce) => ENFORCE,
        Some(Enforcement::Audit) => AUDIT,
    }
}

fn decode(v: u8) -> Option<Enforcement> {
    match v {
        ENFORCE => Some(Enforcement::Enforce),
        AUDIT => Some(Enforcement::Audit),
        _ => None,
    }
}

impl ModeSwitch {
    /// Only the command line's mode set.
    pub fn new(flag: Enforcement) -> Self {
        ModeSwitch {
            flag,
            annotation: AtomicU8::new(UNSET),
            admin: AtomicU8::new(UNSET),
        }
    }

    /// Sets (or with `None` clears) the admin's choice, which wins over every other layer.
    pub fn set_admin(&self, mode: Option<Enforcement>) {
        self.admin.store(encode(mode), Ordering::Relaxed);
    }

    /// Sets (or clears) the pod annotation's mode.
    pub fn set_annotation(&self, mode: Option<Enforcement>) {
        self.annotation.store(encode(mode), Ordering::Relaxed);
    }

    /// The admin's choice, if any.
    pub fn admin(&self) -> Option<Enforcement> {
        decode(self.admin.load(Ordering::Relaxed))
    }

    /// The annotation's mode, if any.
    pub fn annotation(&self) -> Option<Enforcement> {
        decode(self.annotation.load(Ordering::Relaxed))
    }

    /// The command line's mode.
    pub fn flag(&self) -> Enforcement {
        self.flag
    }

    /// The mode in force given the mesh config's (`mesh`), and the layer that set it:
    /// admin, then annotation, then mesh config, then the flag.
    pub fn effective(&self, mesh: Option<Enforcement>) -> (Enforcement, ModeSource) {
        if let Some(m) = self.admin() {
            (m, ModeSource::Admin)
        } else if let Some(m) = self.annotation() {
            (m, ModeSource::Annotation)
        } else if let Some(m) = mesh {
            (m, ModeSource::MeshConfig)
        } else {
            (self.flag, ModeSource::Flag)
        }
    }
}

/// The pod annotation that sets the mode.
pub const MODE_ANNOTATION: &str = "portcullis.io/mode";

/// The mode a downward-API annotations file sets (`key="value"` lines, values quoted and
/// escaped as Go's `%q`): `None` without the annotation; an error for another value.
pub fn annotation_mode(file: &str) -> Result<Option<Enforcement>, String> {
    for line in file.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if key.trim() != MODE_ANNOTATION {
            continue;
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        return Enforcement::parse(value).map(Some).ok_or_else(|| {
            format!("annotation {MODE_ANNOTATION}={value:?} is neither enforce nor audit")
        });
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_then_annotation_then_mesh_then_flag() {
        let switch = ModeSwitch::new(Enforcement::Enforce);
        assert_eq!(
            switch.effective(None),
            (Enforcement::Enforce, ModeSource::Flag)
        );
        assert_eq!(
            switch.effective(Some(Enforcement::Audit)),
            (Enforcement::Audit, ModeSource::MeshConfig)
        );
        switch.set_annotation(Some(Enforcement::Enforce));
        assert_eq!(
            switch.effective(Some(Enforcement::Audit)),
            (Enforcement::Enforce, ModeSource::Annotation)
        );
        switch.set_admin(Some(Enforcement::Audit));
        assert_eq!(
            switch.effective(Some(Enforcement::Enforce)),
            (Enforcement::Audit, ModeSource::Admin)
        );
        switch.set_admin(None);
        switch.set_annotation(None);
        assert_eq!(
            switch.effective(None),
            (Enforcement::Enforce, ModeSource::Flag)
        );
    }

    #[test]
    fn the_annotation_is_read_from_the_downward_api_file() {
        let file = "kubectl.kubernetes.io/restartedAt=\"2026-12-04T10:00:00Z\"\nportcullis.io/mode=\"audit\"\n";
        assert_eq!(annotation_mode(file), Ok(Some(Enforcement::Audit)));
        assert_eq!(
            annotation_mode("portcullis.io/mode=\"Enforce\"\n"),
            Ok(Some(Enforcement::Enforce))
        );
        assert_eq!(annotation_mode("other=\"x\"\n"), Ok(None));
        assert_eq!(annotation_mode(""), Ok(None));
        assert!(annotation_mode("portcullis.io/mode=\"shadow\"").is_err());
    }
}
