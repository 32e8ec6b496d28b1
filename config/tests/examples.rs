//! Every example under examples/ must load and validate.

#[test]
fn quickstart_example_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/quickstart.toml");
    let cfg = rampart_config::load(std::path::Path::new(path)).unwrap();
    assert_eq!(cfg.routes.len(), 1);
}

#[test]
fn several_errors_are_all_reported_with_positions() {
    let err = rampart_config::load(std::path::Path::new("/tmp/t1.toml")).unwrap_err();
    println!("{err}");
    panic!();
}
