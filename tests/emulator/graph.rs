//! The Graph-style paged demo collection: `GET /graph/v1.0/auditLogs/signIns`.

use std::collections::HashSet;

use reqwest::Method;
use serde_json::{Value, json};
use tokenbroker::emulator::config::demo;

use crate::common::*;

const SCOPE: &str = "https://graph.microsoft.com/.default";
const PATH: &str = "/graph/v1.0/auditLogs/signIns";

/// An Entra access token for Graph in `tenant`, through a Key Vault-signed assertion.
async fn graph_token(env: &Env, tenant: &str, app: &str, cert: &str) -> String {
    let kv = env.kv_token().await;
    let (_, c) = env
        .get_json(&kv, &format!("/certificates/{cert}?api-version=2025-07-01"))
        .await;
    let header = json!({"alg": "RS256", "typ": "JWT", "x5t": c["x5t"]});
    let now = now();
    let claims = json!({
        "aud": format!("{}/{tenant}/oauth2/v2.0/token", env.authority()),
        "iss": app, "sub": app,
        "jti": uuid::Uuid::new_v4().to_string(),
        "nbf": now, "exp": now + 600,
    });
    let assertion = env.assertion(cert, header, claims).await;
    let (s, body) = env.exchange_assertion(tenant, app, SCOPE, &assertion).await;
    assert_eq!(s, 200, "{body}");
    body["access_token"].as_str().expect("token").to_owned()
}

async fn contoso_token(env: &Env) -> String {
    graph_token(env, demo::CONTOSO_TENANT, demo::CONTOSO_APP, "contoso-app").await
}

async fn get(
    env: &Env,
    url: &str,
    token: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = env.https.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("graph request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.expect("json body"))
}

/// Follows `@odata.nextLink` from `url`; returns every page's records.
async fn read_all(env: &Env, url: &str, token: &str) -> Vec<Vec<Value>> {
    let mut pages = Vec::new();
    let mut next = Some(url.to_owned());
    while let Some(url) = next {
        assert!(pages.len() < 100, "runaway paging");
        let (s, _, body) = get(env, &url, Some(token)).await;
        assert_eq!(s, 200, "{body}");
        pages.push(body["value"].as_array().expect("value").clone());
        next = body["@odata.nextLink"].as_str().map(str::to_owned);
    }
    pages
}

fn ids(pages: &[Vec<Value>]) -> Vec<String> {
    pages
        .iter()
        .flatten()
        .map(|r| r["id"].as_str().expect("id").to_owned())
        .collect()
}

#[tokio::test]
async fn pages_follow_next_links_to_the_end() {
    let env = start_demo().await;
    let token = contoso_token(&env).await;
    let first = format!("{}{PATH}", env.authority());

    let (s, headers, body) = get(&env, &first, Some(&token)).await;
    assert_eq!(s, 200, "{body}");
    assert!(headers.contains_key("request-id"));
    assert_eq!(
        body["@odata.context"],
        format!("{}/graph/v1.0/$metadata#auditLogs/signIns", env.authority())
    );
    let next = body["@odata.nextLink"].as_str().expect("nextLink");
    assert!(
        next.starts_with(&format!("{}{PATH}?$top=10&$skiptoken=", env.authority())),
        "{next}"
    );
    let r = &body["value"][0];
    for field in [
        "id",
        "createdDateTime",
        "userPrincipalName",
        "appDisplayName",
        "ipAddress",
    ] {
        assert!(r[field].is_string(), "{field} in {r}");
    }
    assert_eq!(r["resourceTenantId"], demo::CONTOSO_TENANT);
    assert_eq!(r["userPrincipalName"], "user01@contoso.onmicrosoft.com");

    // Default page size 10, 35 records: pages of 10, 10, 10, 5, the last without nextLink.
    let pages = read_all(&env, &first, &token).await;
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [10, 10, 10, 5]);
    let all = ids(&pages);
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 35, "distinct ids");

    // Deterministic: another page size gives the same records in the same order.
    let pages7 = read_all(&env, &format!("{first}?$top=7"), &token).await;
    assert_eq!(pages7.iter().map(Vec::len).collect::<Vec<_>>(), [7; 5]);
    assert_eq!(ids(&pages7), all);
    let whole = read_all(&env, &format!("{first}?%24top=999"), &token).await;
    assert_eq!(whole.len(), 1);
    assert_eq!(whole[0], pages.concat());

    let (_, counters) = env.admin(Method::GET, "/counters", None).await;
    let c = &counters["graph"][demo::CONTOSO_TENANT];
    assert_eq!(
        (c["total"].as_u64(), c["failure"].as_u64()),
        (Some(11), Some(0)),
        "{counters}"
    );
    assert_eq!(counters["routes"]["graph.list"]["success"], 11);

    // The same records from another emulator (new keys, new ports).
    let other = start_demo().await;
    let token2 = contoso_token(&other).await;
    let again = read_all(&other, &format!("{}{PATH}", other.authority()), &token2).await;
    assert_eq!(ids(&again), all);
}

#[tokio::test]
async fn tenants_have_their_own_logs_and_skiptokens() {
    let env = start_demo().await;
    let contoso = contoso_token(&env).await;
    let fabrikam = graph_token(
        &env,
        demo::FABRIKAM_TENANT,
        demo::FABRIKAM_APP,
        "fabrikam-app",
    )
    .await;
    let first = format!("{}{PATH}", env.authority());
    let f = read_all(&env, &first, &fabrikam).await;
    assert_eq!(f.iter().map(Vec::len).collect::<Vec<_>>(), [10, 2]);
    assert!(
        f.iter()
            .flatten()
            .all(|r| r["resourceTenantId"] == demo::FABRIKAM_TENANT)
    );
    let c: HashSet<String> = ids(&read_all(&env, &first, &contoso).await)
        .into_iter()
        .collect();
    assert!(ids(&f).iter().all(|id| !c.contains(id)));

    // A Contoso skiptoken is refused with a Fabrikam token.
    let (_, _, body) = get(&env, &first, Some(&contoso)).await;
    let next = body["@odata.nextLink"].as_str().expect("nextLink");
    let (s, _, body) = get(&env, next, Some(&fabrikam)).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (400, Some("BadRequest")),
        "{body}"
    );
    for bad in ["$top=0", "$top=1001", "$top=ten", "$skiptoken=nope"] {
        let (s, _, body) = get(&env, &format!("{first}?{bad}"), Some(&contoso)).await;
        assert_eq!(s, 400, "{bad}: {body}");
    }
    let (_, counters) = env.admin(Method::GET, "/counters", None).await;
    assert_eq!(counters["graph"][demo::FABRIKAM_TENANT]["total"], 3);
    assert_eq!(counters["graph"][demo::FABRIKAM_TENANT]["failure"], 1);
}

#[tokio::test]
async fn next_link_uses_the_host_the_client_used() {
    let env = start_demo().await;
    let token = contoso_token(&env).await;
    let port = env.authority().rsplit(':').next().expect("port").to_owned();
    let base = format!("https://login.microsoftonline.com:{port}");
    let (s, _, body) = get(&env, &format!("{base}{PATH}?$top=30"), Some(&token)).await;
    assert_eq!(s, 200, "{body}");
    let next = body["@odata.nextLink"].as_str().expect("nextLink");
    assert!(
        next.starts_with(&format!("{base}{PATH}?$top=30&$skiptoken=")),
        "{next}"
    );
    let (s, _, body) = get(&env, next, Some(&token)).await;
    assert_eq!(s, 200);
    assert_eq!(body["value"].as_array().map(Vec::len), Some(5));
    assert!(body.get("@odata.nextLink").is_none());
}

#[tokio::test]
async fn invalid_tokens_get_graph_401s() {
    let env = start_demo().await;
    let url = format!("{}{PATH}", env.authority());
    let check = |(s, h, body): (u16, reqwest::header::HeaderMap, Value), what: &str| {
        assert_eq!(s, 401, "{what}: {body}");
        assert_eq!(
            body["error"]["code"], "InvalidAuthenticationToken",
            "{what}"
        );
        assert!(body["error"]["message"].is_string(), "{what}");
        assert!(body["error"]["innerError"]["date"].is_string(), "{what}");
        assert!(h.contains_key("www-authenticate"), "{what}");
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    check(get(&env, &url, None).await, "no token");
    check(get(&env, &url, Some("not-a-jwt")).await, "malformed");

    // Wrong audience: a Key Vault token.
    let kv = env.kv_token().await;
    let m = check(get(&env, &url, Some(&kv)).await, "vault audience");
    assert!(m.contains("audience"), "{m}");

    // Tampered: claims changed, signature kept.
    let token = contoso_token(&env).await;
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut c = claims(&token);
    c["roles"] = json!(["AuditLog.Read.All", "Directory.ReadWrite.All"]);
    parts[1] = b64url(&serde_json::to_vec(&c).expect("claims"));
    let m = check(get(&env, &url, Some(&parts.join("."))).await, "tampered");
    assert!(m.contains("Signature"), "{m}");

    // A managed-identity token for Graph (host tenant = Contoso) is accepted, as by Graph.
    let mi = env.mi_token(GRAPH, None).await;
    assert_eq!(get(&env, &url, Some(&mi)).await.0, 200);

    // Expired on the emulator's clock: Entra tokens live at most 90 minutes.
    assert_eq!(get(&env, &url, Some(&token)).await.0, 200);
    let (s, _) = env
        .admin(
            Method::POST,
            "/clock/advance",
            Some(json!({"seconds": 7200})),
        )
        .await;
    assert_eq!(s, 200);
    let m = check(get(&env, &url, Some(&token)).await, "expired");
    assert!(m.contains("expired"), "{m}");

    let (_, counters) = env.admin(Method::GET, "/counters", None).await;
    assert_eq!(counters["graph"]["-"]["failure"], 2, "{counters}");
    let c = &counters["graph"][demo::CONTOSO_TENANT];
    assert_eq!(
        (c["success"].as_u64(), c["failure"].as_u64()),
        (Some(2), Some(3)),
        "{counters}"
    );
}

#[tokio::test]
async fn faults_and_unknown_paths() {
    let env = start_demo().await;
    let token = contoso_token(&env).await;
    let url = format!("{}{PATH}", env.authority());
    let (s, _) = env
        .admin(
            Method::POST,
            "/faults",
            Some(json!({"route": "graph", "tenant": "contoso.onmicrosoft.com", "fail": {"status": 429, "retry_after": 1}, "count": 1})),
        )
        .await;
    assert_eq!(s, 201);
    let (s, h, body) = get(&env, &url, Some(&token)).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (429, Some("TooManyRequests"))
    );
    assert_eq!(h["retry-after"], "1");
    assert_eq!(get(&env, &url, Some(&token)).await.0, 200);

    let (s, _, body) = get(
        &env,
        &format!("{}/graph/v1.0/users", env.authority()),
        Some(&token),
    )
    .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (400, Some("BadRequest"))
    );
    let resp = env
        .https
        .post(&url)
        .bearer_auth(&token)
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 405);
}

#[tokio::test]
async fn record_count_is_configurable() {
    let mut config = tokenbroker::emulator::EmulatorConfig::demo();
    config.tenants[0].graph_records = 0;
    let env = start(config).await;
    let token = contoso_token(&env).await;
    let pages = read_all(&env, &format!("{}{PATH}", env.authority()), &token).await;
    assert_eq!(pages, [Vec::<Value>::new()]);

    let parsed = tokenbroker::emulator::EmulatorConfig::from_toml_str(
        "[[tenants]]\ntenant_id = \"t1\"\ngraph_records = 3\n[[tenants]]\ntenant_id = \"t2\"\n",
    )
    .expect("config parses");
    assert_eq!(parsed.tenants[0].graph_records, 3);
    assert_eq!(parsed.tenants[1].graph_records, 35);
}
