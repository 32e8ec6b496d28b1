//! What the proxy's and the controller's admin listeners share: the page around both
//! dashboards ([`page`]) and the optional admin token ([`auth`]). Neither role depends
//! on the other; both depend on this.

pub mod auth;
pub mod page;
