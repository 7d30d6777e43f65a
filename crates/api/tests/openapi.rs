//! The OpenAPI document checked into `openapi/novacron.json` must equal the one generated from
//! the code. Regenerate it with `UPDATE_OPENAPI=1 cargo test -p novacron-api --test openapi`.

#[test]
fn checked_in_openapi_document_matches_the_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi/novacron.json");
    let generated = novacron_api::openapi_json();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("write openapi/novacron.json");
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "openapi/novacron.json is out of date; run `UPDATE_OPENAPI=1 cargo test -p novacron-api --test openapi` and commit it"
    );
}

#[test]
fn every_operation_documents_its_responses_and_the_bearer_scheme_exists() {
    let document: serde_json::Value =
        serde_json::from_str(&novacron_api::openapi_json()).expect("json");
    let paths = document["paths"].as_object().expect("paths");
    for expected in [
        "/api/v1/vms",
        "/api/v1/vms/{name}/console",
        "/api/v1/images",
        "/api/v1/events",
    ] {
        assert!(paths.contains_key(expected), "{expected} is documented");
    }
    for (path, item) in paths {
        for (method, operation) in item.as_object().expect("operation map") {
            let responses = operation["responses"].as_object().expect("responses");
            assert!(
                !responses.is_empty(),
                "{method} {path} documents its responses"
            );
        }
    }
    assert!(document["components"]["securitySchemes"]["bearer"].is_object());
    assert_eq!(
        document["paths"]["/api/v1/health"]["get"]["security"],
        serde_json::json!([{}])
    );
}
