//! What binary is running (version, git commit, compiler, target), for `rampart
//! version` and the `rampart_build_info` metric. The `rampart` binary sets it at start
//! from what its build script recorded; libraries and tests see the defaults.

use std::sync::OnceLock;

/// Build facts of the running binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildInfo {
    /// Package version.
    pub version: &'static str,
    /// Git commit (short), `unknown` outside a checkout.
    pub git: &'static str,
    /// `rustc --version` of the compiler.
    pub rustc: &'static str,
    /// Target triple.
    pub target: &'static str,
    /// Cargo profile (`release`, `debug`).
    pub profile: &'static str,
}

static INFO: OnceLock<BuildInfo> = OnceLock::new();

/// Records the running binary's build facts (first call wins).
pub fn set(info: BuildInfo) {
    let _ = INFO.set(info);
}

/// The running binary's build facts.
#[must_use]
pub fn get() -> &'static BuildInfo {
    INFO.get_or_init(|| BuildInfo {
        version: env!("CARGO_PKG_VERSION"),
        git: "unknown",
        rustc: "unknown",
        target: "unknown",
        profile: "unknown",
    })
}

impl BuildInfo {
    /// Label names and values of `rampart_build_info`.
    #[must_use]
    pub fn labels(&self) -> [(&'static str, &'static str); 5] {
        [
            ("version", self.version),
            ("git", self.git),
            ("rustc", self.rustc),
            ("target", self.target),
            ("profile", self.profile),
        ]
    }
}

impl std::fmt::Display for BuildInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rampart {} (git {}, {} build for {}, {})",
            self.version, self.git, self.profile, self.target, self.rustc
        )
    }
}
