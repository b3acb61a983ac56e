//! Unit tests of the broker: request validation, and the cache, single flight and refresh
//! scheduling over fake upstreams on a `ManualClock` (tokio's time paused, so `settle` lets
//! every task run until all wait on the manual clock).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use url::Url;

use super::*;
use crate::clock::ManualClock;
use crate::entra::{EntraError, EntraErrorClass, EntraToken, ExchangeRequest};
use crate::sensitive::Sensitive;
use crate::signer::{CertificateInfo, KeyRef as SignerKey, SignerError};

/// What the fake Entra answers.
#[derive(Debug, Clone)]
enum Answer {
    Token {
        lifetime: Duration,
        refresh_in: Option<Duration>,
    },
    /// A transient failure (503) with an optional `Retry-After`.
    Fail(Option<Duration>),
    /// A configuration error (a disabled app), remembered in the negative cache.
    Refuse,
    Panic,
    /// Refuses the assertion's key (AADSTS700027), as after a rotation.
    RejectKey,
    /// Never answers.
    Hang,
    /// Answers a token of the given lifetime once the gate is opened.
    Wait(Arc<tokio::sync::Notify>, Duration),
    /// Refuses (as `Refuse`) once the gate is opened.
    RefuseWhen(Arc<tokio::sync::Notify>),
    /// Writes its request after `connecting` (as a connection is made), then answers an
    /// hourly token after the call's `answering` (by call, the last for those after).
    Slow {
        connecting: Duration,
        answering: Vec<Duration>,
    },
}

impl Answer {
    /// Tokens valid for an hour, refreshed by the broker's own rule.
    fn hourly() -> Answer {
        Answer::Token {
            lifetime: HOUR,
            refresh_in: None,
        }
    }
}

#[derive(Debug)]
struct FakeEntra {
    answer: Mutex<Answer>,
    calls: AtomicUsize,
    /// The `claims` parameter of each call, in order.
    claims: Mutex<Vec<Option<String>>>,
}

impl FakeEntra {
    fn set(&self, a: Answer) {
        *self.answer.lock().unwrap() = a;
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The `claims` parameter of the last call, as JSON.
    fn last_claims(&self) -> Option<serde_json::Value> {
        let sent = self.claims.lock().unwrap();
        let last = sent.last().expect("a call").as_deref()?;
        Some(serde_json::from_str(last).unwrap())
    }
}

#[async_trait]
impl TokenExchange for FakeEntra {
    async fn exchange(&self, req: ExchangeRequest<'_>) -> Result<EntraToken, EntraError> {
        self.claims
            .lock()
            .unwrap()
            .push(req.claims.map(str::to_owned));
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        // A runaway refresh loop fails its test instead of spinning forever.
        assert!(n < 100, "runaway: {n} exchanges");
        let answer = self.answer.lock().unwrap().clone();
        match answer {
            Answer::Token {
                lifetime,
                refresh_in,
            } => Ok(EntraToken {
                access_token: Sensitive::new(format!("token-{n}")),
                token_type: "Bearer",
                expires_in: lifetime,
                refresh_in,
            }),
            Answer::Fail(retry_after) => Err(EntraError {
                class: EntraErrorClass::Retryable,
                status: 503,
                error: "temporarily_unavailable".into(),
                codes: vec![],
                description: "down".into(),
                correlation_id: Some(req.correlation_id.to_string()),
                trace_id: None,
                retry_after,
            }),
            Answer::Panic => panic!("the fake exchange fails hard"),
            Answer::RejectKey => Err(EntraError {
                class: EntraErrorClass::KeyRejected,
                status: 401,
                error: "invalid_client".into(),
                codes: vec![700027],
                description: "AADSTS700027: Client assertion failed signature validation.".into(),
                correlation_id: Some(req.correlation_id.to_string()),
                trace_id: None,
                retry_after: None,
            }),
            Answer::Hang => futures::future::pending().await,
            Answer::Wait(gate, lifetime) => {
                gate.notified().await;
                Ok(EntraToken {
                    access_token: Sensitive::new(format!("token-{n}")),
                    token_type: "Bearer",
                    expires_in: lifetime,
                    refresh_in: None,
                })
            }
            Answer::Slow {
                connecting,
                answering,
            } => {
                tokio::time::sleep(connecting).await;
                crate::outbound::WriteWatch::mark();
                let last = answering.len().saturating_sub(1);
                tokio::time::sleep(answering[n.min(last)]).await;
                Ok(EntraToken {
                    access_token: Sensitive::new(format!("token-{n}")),
                    token_type: "Bearer",
                    expires_in: HOUR,
                    refresh_in: None,
                })
            }
            Answer::RefuseWhen(gate) => {
                gate.notified().await;
                Err(refusal(&req))
            }
            Answer::Refuse => Err(refusal(&req)),
        }
    }
}

/// Entra's refusal of a disabled app.
fn refusal(req: &ExchangeRequest<'_>) -> EntraError {
    EntraError {
        class: EntraErrorClass::Configuration,
        status: 400,
        error: "unauthorized_client".into(),
        codes: vec![7000112],
        description: "AADSTS7000112: Application is disabled.".into(),
        correlation_id: Some(req.correlation_id.to_string()),
        trace_id: None,
        retry_after: None,
    }
}

/// Key Vault: certificate reads fail while `down` is set.
#[derive(Debug, Default)]
struct FakeSigner {
    down: std::sync::atomic::AtomicBool,
    /// Certificate reads fail while set, as when the broker's own identity is refused its
    /// token for Key Vault (the managed identity endpoint's 400).
    identity_refused: std::sync::atomic::AtomicBool,
    /// Certificate reads never answer while set.
    hang: std::sync::atomic::AtomicBool,
    /// Signs made; those past `signs_ok` fail (503).
    signs: AtomicUsize,
    signs_ok: std::sync::atomic::AtomicUsize,
    /// The certificate's current version (`v1` when unset), and a version whose key is gone.
    version: Mutex<Option<&'static str>>,
    gone: Mutex<Option<&'static str>>,
}

impl FakeSigner {
    fn new() -> FakeSigner {
        FakeSigner {
            signs_ok: AtomicUsize::new(usize::MAX),
            ..Default::default()
        }
    }
}

#[async_trait]
impl Signer for FakeSigner {
    async fn certificate(&self, vault: &Url, name: &str) -> Result<CertificateInfo, SignerError> {
        if self.hang.load(Ordering::SeqCst) {
            futures::future::pending::<()>().await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(SignerError::Unavailable {
                service: "Key Vault",
                message: "503 from the vault".into(),
                retry_after: None,
                throttled: false,
            });
        }
        if self.identity_refused.load(Ordering::SeqCst) {
            return Err(SignerError::IdentityNotAssigned {
                status: 400,
                message: "Identity not found".into(),
                unnamed: false,
            });
        }
        let version = self.version.lock().unwrap().unwrap_or("v1");
        Ok(CertificateInfo {
            x5t: "x5t".into(),
            x5t_s256: "x5t-s256".into(),
            key: SignerKey {
                vault_url: vault.clone(),
                name: name.into(),
                version: version.into(),
            },
            version: version.into(),
            not_after: None,
        })
    }

    async fn sign(
        &self,
        key: &SignerKey,
        _algorithm: crate::config::SigningAlgorithm,
        digest: [u8; 32],
    ) -> Result<Vec<u8>, SignerError> {
        // Not ready at the first poll, as a call over the network is not.
        tokio::task::yield_now().await;
        if *self.gone.lock().unwrap() == Some(key.version.as_str()) {
            return Err(SignerError::NotFound {
                service: "Key Vault",
                what: format!("key version {}", key.version),
                code: "KeyNotFound".into(),
                message: "gone".into(),
            });
        }
        if self.signs.fetch_add(1, Ordering::SeqCst) >= self.signs_ok.load(Ordering::SeqCst) {
            return Err(SignerError::Unavailable {
                service: "Key Vault",
                message: "503 from the vault".into(),
                retry_after: None,
                throttled: false,
            });
        }
        Ok(digest.to_vec())
    }
}

struct Fixture {
    broker: Broker,
    clock: ManualClock,
    entra: Arc<FakeEntra>,
    vault: Arc<FakeSigner>,
}

const HOUR: Duration = Duration::from_secs(3600);

/// A broker with one tenant, `contoso`, whose Entra answers tokens of `lifetime`; `extra`
/// is added to the configuration (after a `[resilience]` table header).
fn fixture(lifetime: Duration, extra: &str) -> Fixture {
    fixture_for(lifetime, "", extra)
}

/// `fixture`, with `contoso` opted in to continuous access evaluation.
fn fixture_cae(lifetime: Duration, extra: &str) -> Fixture {
    fixture_for(lifetime, "client_capabilities = [\"cp1\"]\n", extra)
}

/// `fixture`, with `tenant` added to `contoso`'s table.
fn fixture_for(lifetime: Duration, tenant: &str, extra: &str) -> Fixture {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nplaintext = true\n\n\
         [tenants.contoso]\n{tenant}tenant_id = \"c0c0c0c0-0000-4000-8000-00000000c001\"\n\
         client_id = \"c0c0c0c0-a990-4000-8000-000000000a01\"\n\
         credential = {{ type = \"key_vault_certificate\", vault_url = \"https://t.vault.azure.net\", certificate = \"c\" }}\n\n\
         [resilience]\nsign_burst = 1000\nexchange_burst = 1000\n{extra}\n"
    );
    let config =
        Config::from_toml_str(&toml, std::path::Path::new("."), &|_| None).expect("config");
    let clock = ManualClock::new();
    let entra = Arc::new(FakeEntra {
        answer: Mutex::new(Answer::Token {
            lifetime,
            refresh_in: None,
        }),
        calls: AtomicUsize::new(0),
        claims: Mutex::default(),
    });
    let vault = Arc::new(FakeSigner::new());
    let broker = Broker::new(
        &config,
        Upstreams {
            signer: vault.clone(),
            hsm: Arc::new(FakeSigner::new()),
            identity: Arc::new(crate::identity::ManagedIdentityAssertions::new(
                Default::default(),
            )),
            exchange: entra.clone(),
            clock: Arc::new(clock.clone()),
        },
    );
    Fixture {
        broker,
        clock,
        entra,
        vault,
    }
}

/// A request for `contoso`'s Graph token.
fn contoso(min_validity: Option<u64>, force_refresh: bool) -> TokenRequest {
    TokenRequest {
        tenant: "contoso".into(),
        scopes: vec![GRAPH.into()],
        min_validity: min_validity.map(Duration::from_secs),
        force_refresh,
        claims: None,
    }
}

impl Fixture {
    async fn get(&self, min_validity: Option<u64>) -> Result<IssuedToken, BrokerError> {
        self.broker.get_token(contoso(min_validity, false)).await
    }

    async fn get_forced(&self) -> Result<IssuedToken, BrokerError> {
        self.broker.get_token(contoso(None, true)).await
    }

    /// `get(None)` in a task of its own, for a test that moves the clock meanwhile.
    fn spawn_get(&self) -> tokio::task::JoinHandle<Result<IssuedToken, BrokerError>> {
        let broker = self.broker.clone();
        tokio::spawn(async move { broker.get_token(contoso(None, false)).await })
    }

    /// `get_forced()` in a task of its own.
    fn spawn_forced(&self) -> tokio::task::JoinHandle<Result<IssuedToken, BrokerError>> {
        let broker = self.broker.clone();
        tokio::spawn(async move { broker.get_token(contoso(None, true)).await })
    }

    /// The slot of `contoso`'s Graph token.
    async fn slot(&self) -> Arc<Slot<FlowError>> {
        let key = self.broker.key("contoso", &[GRAPH.into()]).unwrap();
        self.broker.cache().existing(&key).await.expect("cached")
    }

    async fn watch(&self) -> tokio::sync::watch::Receiver<SlotState> {
        self.broker
            .subscribe("contoso", &[GRAPH.to_string()])
            .await
            .unwrap()
            .0
    }

    /// Whole seconds `t` has left.
    fn left(&self, t: &IssuedToken) -> u64 {
        t.token.remaining(self.clock.moment()).as_secs()
    }

    /// Moves the manual clock, then lets every task run until all wait again.
    async fn advance(&self, d: Duration) {
        self.clock.advance(d);
        settle().await;
    }
}

const GRAPH: &str = "https://graph.microsoft.com/.default";

/// Lets every spawned task run until all of them wait (on the manual clock or forever):
/// with tokio's time paused, its clock moves only once nothing else can run.
async fn settle() {
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn token_of(t: &IssuedToken) -> &str {
    t.token.access_token.expose()
}

#[tokio::test(start_paused = true)]
async fn callers_asking_no_minimum_are_owed_at_most_half_the_tokens_life() {
    // A default minimum beyond what Entra's tokens live (3599 s) is accepted by the
    // configuration: such callers are owed half the token's life, and the key is refreshed as
    // usual, not every half minute.
    let f = fixture(
        HOUR - Duration::from_secs(1),
        "\n[cache]\ndefault_min_validity_secs = 3600",
    );
    assert_eq!(f.get(None).await.unwrap().source, TokenSource::Exchange);
    f.advance(Duration::from_secs(20 * 60)).await;
    assert_eq!(f.get(None).await.unwrap().source, TokenSource::Cache);
    assert_eq!(f.entra.calls(), 1, "not refreshed within 20 minutes");
    // A caller's own minimum is still held to the letter.
    assert!(matches!(
        f.get(Some(3600)).await,
        Err(BrokerError::MinValidityBeyondLifetime { .. })
    ));
    // Tokens shorter than the default minimum (300 s) serve such callers too.
    let f = fixture(Duration::from_secs(240), "");
    assert_eq!(f.get(None).await.unwrap().source, TokenSource::Exchange);
    assert_eq!(f.get(None).await.unwrap().source, TokenSource::Cache);
    f.advance(Duration::from_secs(121)).await;
    settle().await;
    assert_eq!(
        f.entra.calls(),
        2,
        "refreshed before it stopped serving them"
    );
    assert_eq!(f.get(None).await.unwrap().source, TokenSource::Cache);
}

#[tokio::test(start_paused = true)]
async fn a_min_validity_no_token_can_meet_is_refused_from_the_cache_without_fetching() {
    // Entra's tokens live 3599 s; the broker's longest minimum validity is 3600 s.
    let f = fixture(HOUR - Duration::from_secs(1), "");
    let first = f.get(None).await.unwrap();
    assert_eq!(f.entra.calls(), 1);
    for _ in 0..5 {
        match f.get(Some(3600)).await {
            Err(BrokerError::MinValidityBeyondLifetime { issued, wanted }) => {
                assert_eq!(issued, Duration::from_secs(3599), "the most a token has");
                assert_eq!(wanted, HOUR);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(f.entra.calls(), 1, "no fetch for a validity no token has");
    let again = f.get(None).await.unwrap();
    assert_eq!(
        token_of(&again),
        token_of(&first),
        "the good token stays cached"
    );
    assert_eq!(again.source, TokenSource::Cache);

    // A validity a new token has is fetched early, but no more often than a forced refresh.
    f.advance(Duration::from_secs(100)).await;
    let early = f.get(Some(3550)).await.unwrap();
    assert_eq!(early.source, TokenSource::Exchange);
    assert_eq!(f.entra.calls(), 2);
    f.advance(Duration::from_secs(10)).await;
    match f.get(Some(3590)).await {
        Err(BrokerError::MinValidityUnmet { remaining, .. }) => {
            assert_eq!(
                remaining,
                Duration::from_secs(3589),
                "what the token has left"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        f.entra.calls(),
        2,
        "one early fetch per forced-refresh interval"
    );
    f.advance(Duration::from_secs(30)).await;
    f.get(Some(3590)).await.unwrap();
    assert_eq!(f.entra.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_fetch_slowed_by_retries_does_not_lower_what_tokens_are_issued_with() {
    let f = Arc::new(fixture(HOUR, ""));
    f.entra.set(Answer::Fail(Some(Duration::from_secs(5))));
    let asking = f.clone();
    let first = tokio::spawn(async move { asking.get(None).await });
    settle().await;
    assert_eq!(f.entra.calls(), 1);
    f.entra.set(Answer::hourly());
    // The retry after Retry-After: the token comes back with 5 s less left than issued.
    f.advance(Duration::from_secs(5)).await;
    first.await.unwrap().unwrap();
    assert_eq!(f.entra.calls(), 2);
    // A new token would have its full hour: asking for it fetches one (once per forced
    // interval) rather than being refused as beyond what tokens are issued with.
    let t = f.get(Some(3600)).await.unwrap();
    assert_eq!(t.source, TokenSource::Exchange);
    assert_eq!(f.entra.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_cold_key_asked_for_too_much_validity_is_fetched_once() {
    let f = fixture(HOUR - Duration::from_secs(1), "");
    for _ in 0..3 {
        assert!(matches!(
            f.get(Some(3600)).await,
            Err(BrokerError::MinValidityUnmet { .. }
                | BrokerError::MinValidityBeyondLifetime { .. })
        ));
    }
    assert_eq!(f.entra.calls(), 1);
    f.get(None).await.unwrap();
    assert_eq!(f.entra.calls(), 1, "the token fetched is cached and served");
}

#[test]
fn scopes_in_normal_form_are_kept_and_the_fast_check_agrees_with_the_full_path() {
    let cases: Vec<Vec<String>> = [
        &["https://graph.microsoft.com/.default"][..],
        &["a", "b", "c"],
        &["b", "a"],
        &["a", "a"],
        &[" a"],
        &["a\u{7f}"],
        &["é"],
        &[""],
        &["a b"],
        &["x"; 9],
    ]
    .iter()
    .map(|c| c.iter().map(|s| s.to_string()).collect())
    .chain([
        vec!["x".repeat(MAX_SCOPE_LEN)],
        vec!["x".repeat(MAX_SCOPE_LEN + 1)],
    ])
    .collect();
    let mut fast = 0;
    for c in &cases {
        let full = normalise_full(c).ok();
        let fast_path = normalise_scopes(c);
        assert_eq!(fast_path.as_deref().ok(), full.as_deref(), "{c:?}");
        // The normal form is borrowed, never copied.
        assert_eq!(
            matches!(fast_path, Ok(Cow::Borrowed(_))),
            already_normal(c),
            "{c:?}"
        );
        if already_normal(c) {
            fast += 1;
            assert_eq!(full.as_ref(), Some(c), "{c:?} is in normal form");
        }
    }
    assert_eq!(fast, 3, "the graph scope, a b c, and the longest scope");
}

#[test]
fn scopes_are_normalised() {
    let asked = [
        " https://graph.microsoft.com/.default".into(),
        "api://b/.default".into(),
        "https://graph.microsoft.com/.default".into(),
    ];
    let s = normalise_scopes(&asked).unwrap();
    assert_eq!(
        s,
        vec!["api://b/.default", "https://graph.microsoft.com/.default"]
    );
}

#[test]
fn bad_scopes_name_the_field() {
    for bad in [
        vec![],
        vec!["".to_string()],
        vec!["a b".to_string()],
        vec!["x".repeat(600)],
    ] {
        match normalise_scopes(&bad) {
            Err(BrokerError::InvalidArgument { field, .. }) => assert_eq!(field, "scopes"),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
}

#[test]
fn refresh_is_at_the_fraction_less_jitter() {
    let life = Duration::from_secs(3600);
    for _ in 0..100 {
        let r = flow::refresh_after(life, 0.5);
        assert!(
            r <= Duration::from_secs(1800) && r >= Duration::from_secs(1440),
            "{r:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_exchange_is_retried_with_a_fresh_assertion_and_a_failing_sign_ends_it() {
    let f = fixture(HOUR, "max_attempts = 3");
    // Entra fails once, then answers: the retry presents a newly signed assertion.
    f.entra.set(Answer::Fail(None));
    let get = f.spawn_get();
    settle().await;
    assert_eq!(f.entra.calls(), 1);
    f.entra.set(Answer::hourly());
    f.advance(Duration::from_secs(10)).await;
    get.await.unwrap().unwrap();
    assert_eq!(f.entra.calls(), 2);
    assert_eq!(
        f.vault.signs.load(Ordering::SeqCst),
        2,
        "one sign per attempt"
    );

    // The fresh assertion cannot be signed: the fetch ends with Key Vault's failure, retried
    // by Key Vault's own guard only (three tries), not again for each exchange attempt.
    let g = fixture(HOUR, "max_attempts = 3");
    g.entra.set(Answer::Fail(None));
    g.vault.signs_ok.store(1, Ordering::SeqCst);
    let get = g.spawn_get();
    // Small steps, so that every backoff ends well within the fetch's budget.
    while !get.is_finished() {
        g.advance(Duration::from_millis(100)).await;
    }
    match get.await.unwrap() {
        Err(BrokerError::Upstream { source, .. }) => {
            assert!(source.to_string().contains("Key Vault"), "{source}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(g.entra.calls(), 1, "no exchange without a fresh assertion");
    assert_eq!(g.vault.signs.load(Ordering::SeqCst), 1 + 3);
}

#[tokio::test(start_paused = true)]
async fn a_watched_key_whose_first_fetch_fails_is_retried_until_it_has_a_token() {
    let f = fixture(HOUR, "max_attempts = 1");
    f.entra.set(Answer::Fail(None));
    let rx = f.watch().await;
    settle().await;
    assert_eq!(f.entra.calls(), 1);
    assert!(rx.borrow().failure.is_some() && rx.borrow().token.is_none());
    // Entra stays down for a few minutes: retried with backoff (at most a minute apart).
    for _ in 0..3 {
        f.advance(Duration::from_secs(61)).await;
    }
    let tries = f.entra.calls();
    assert!(tries >= 4, "{tries} attempts");
    // A second watcher adds no retrying of its own: each move of the clock past the longest
    // wait (a minute) wakes the one retrying task once; two tasks would try twice as often.
    let rx2 = f.watch().await;
    settle().await;
    let before = f.entra.calls();
    for _ in 0..20 {
        f.advance(Duration::from_secs(61)).await;
    }
    let tried = f.entra.calls() - before;
    assert_eq!(tried, 20, "one try per minute");
    f.entra.set(Answer::hourly());
    f.advance(Duration::from_secs(61)).await;
    let state = rx.borrow().clone();
    assert!(
        state.token.is_some() && state.failure.is_none(),
        "{state:?}"
    );
    assert!(rx2.borrow().token.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_watched_key_refused_by_configuration_is_fetched_again_once_its_negative_entry_ends() {
    let f = fixture(HOUR, "max_attempts = 1\nnegative_ttl_secs = 30");
    f.entra.set(Answer::Refuse);
    // A request first: the refusal is remembered, and a watcher arrives during that time.
    assert!(f.get(None).await.is_err());
    let rx = f.watch().await;
    settle().await;
    assert_eq!(
        f.entra.calls(),
        1,
        "not asked again while the refusal is remembered"
    );
    f.entra.set(Answer::hourly());
    f.advance(Duration::from_secs(31)).await;
    assert_eq!(f.entra.calls(), 2);
    assert!(rx.borrow().token.is_some());
}

#[tokio::test(start_paused = true)]
async fn nobody_watching_ends_the_retries() {
    let f = fixture(HOUR, "max_attempts = 1");
    f.entra.set(Answer::Fail(None));
    let rx = f.watch().await;
    settle().await;
    drop(rx);
    for _ in 0..3 {
        f.advance(Duration::from_secs(61)).await;
    }
    assert_eq!(f.entra.calls(), 1, "no retry once nobody watches");
}

#[tokio::test(start_paused = true)]
async fn a_fetch_that_panics_fails_its_callers_and_the_next_request_fetches_again() {
    let f = fixture(HOUR, "");
    f.entra.set(Answer::Panic);
    match f.get(None).await {
        Err(BrokerError::Upstream { source, .. }) => {
            assert!(matches!(*source, FlowError::Internal(_)), "{source}");
            assert!(
                !source.to_string().contains("fails hard"),
                "the panic's message is for the log: {source}"
            );
        }
        other => panic!("{other:?}"),
    }
    f.entra.set(Answer::hourly());
    let t = f
        .get(None)
        .await
        .expect("a new fetch, not the finished flight");
    assert_eq!(t.source, TokenSource::Exchange);
    assert_eq!(f.entra.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_refresh_refused_for_good_is_tried_again_once_per_negative_period() {
    let f = fixture(HOUR, "");
    f.get(None).await.unwrap();
    // The app is disabled; the refresh (due within 1800 s) is refused and remembered for
    // the negative period (30 s).
    f.entra.set(Answer::Refuse);
    f.advance(Duration::from_secs(1800)).await;
    assert_eq!(f.entra.calls(), 2);
    for _ in 0..29 {
        f.advance(Duration::from_secs(1)).await;
    }
    assert_eq!(f.entra.calls(), 2, "not again within the negative period");
    f.advance(Duration::from_secs(2)).await;
    assert_eq!(f.entra.calls(), 3, "once it is over");
}

#[tokio::test(start_paused = true)]
async fn a_short_lived_token_is_refreshed_before_it_stops_serving_default_callers() {
    // 8-minute tokens refreshed at 90% of their life (less jitter: 384-432 s), after the
    // 240 s at which they stop meeting the default minimum validity (300 s, at most half
    // their life).
    let f = fixture(
        Duration::from_secs(480),
        "\n[cache]\nrefresh_fraction = 0.9",
    );
    f.get(None).await.unwrap();
    f.advance(Duration::from_secs(245)).await;
    assert_eq!(f.entra.calls(), 2, "refreshed by 240 s");
    let t = f.get(None).await.unwrap();
    assert_eq!(
        t.source,
        TokenSource::Cache,
        "a default caller is served the refreshed token, not a fetch of its own"
    );
    assert_eq!(f.entra.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_forced_refresh_takes_over_the_refresh_chain_of_the_token_it_replaced() {
    let f = fixture(HOUR, "\n[cache]\nforce_refresh_interval_secs = 0");
    let refresh_in = |s| Answer::Token {
        lifetime: HOUR,
        refresh_in: Some(Duration::from_secs(s)),
    };
    // The first token is due for refresh at 1000 s; a forced refresh at 100 s gets one due
    // at 600 s, earlier.
    f.entra.set(refresh_in(1000));
    f.get(None).await.unwrap();
    f.advance(Duration::from_secs(100)).await;
    f.entra.set(refresh_in(500));
    f.get_forced().await.unwrap();
    assert_eq!(f.entra.calls(), 2);
    // Entra goes down, asking for 300 s between tries: the refresh at 600 s fails, and its
    // chain tries again at 900 s and 1200 s.
    f.entra.set(Answer::Fail(Some(Duration::from_secs(300))));
    f.advance(Duration::from_secs(501)).await;
    assert_eq!(f.entra.calls(), 3);
    f.advance(Duration::from_secs(398)).await;
    let at_999 = f.entra.calls();
    // At 1000 s, the replaced token's schedule finds it is not the slot's token and ends:
    // one chain of retries per key, not two.
    f.advance(Duration::from_secs(2)).await;
    assert_eq!(f.entra.calls(), at_999, "no second chain at 1000 s");
}

#[tokio::test(start_paused = true)]
async fn a_key_version_gone_before_an_exchange_retry_is_replaced_by_the_current_one() {
    let f = fixture(HOUR, "max_attempts = 3");
    f.entra.set(Answer::Fail(None));
    let get = f.spawn_get();
    settle().await;
    assert_eq!(
        f.entra.calls(),
        1,
        "signed with v1, then the exchange failed"
    );
    // Meanwhile the certificate is rotated and the old key removed (as from an HSM).
    *f.vault.version.lock().unwrap() = Some("v2");
    *f.vault.gone.lock().unwrap() = Some("v1");
    f.entra.set(Answer::hourly());
    while !get.is_finished() {
        f.advance(Duration::from_millis(100)).await;
    }
    let t = get
        .await
        .unwrap()
        .expect("signed with v2 after the re-read");
    assert_eq!(t.source, TokenSource::Exchange);
    assert_eq!(f.entra.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_breaker_probe_that_panics_lets_the_next_call_probe() {
    let f = fixture(
        HOUR,
        "max_attempts = 1\nbreaker_failures = 1\nbreaker_cool_down_secs = 5",
    );
    // One failure opens Entra's breaker for the tenant.
    f.entra.set(Answer::Fail(None));
    assert!(f.get(None).await.is_err());
    // Past the failure's hold-off, within the cool-down.
    f.advance(TRANSIENT_HOLD).await;
    match f.get(None).await {
        Err(e) => assert!(e.to_string().contains("circuit open"), "{e}"),
        other => panic!("{other:?}"),
    }
    // After the cool-down the next call is the probe, and it panics.
    f.advance(Duration::from_secs(6)).await;
    f.entra.set(Answer::Panic);
    assert!(f.get(None).await.is_err());
    // Another probe may go: it is not "circuit open" for ever.
    f.entra.set(Answer::hourly());
    let t = f.get(None).await.expect("the next call probes");
    assert_eq!(t.source, TokenSource::Exchange);
}

#[tokio::test(start_paused = true)]
async fn an_absurd_retry_after_holds_back_the_refresh_retries_five_minutes_at_most() {
    let f = fixture(HOUR, "max_attempts = 1");
    f.get(None).await.unwrap();
    // A day, and a number of seconds no deadline can hold.
    for hint in [Duration::from_secs(86_400), Duration::from_secs(u64::MAX)] {
        f.entra.set(Answer::Fail(Some(hint)));
        let before = f.entra.calls();
        // Past the refresh time (at most half the lifetime): the refresh fails.
        f.advance(HOUR / 2).await;
        assert_eq!(f.entra.calls(), before + 1);
        f.advance(MAX_RETRY_AFTER).await;
        assert_eq!(f.entra.calls(), before + 2, "retried after five minutes");
        f.entra.set(Answer::hourly());
        f.advance(MAX_RETRY_AFTER).await;
        assert_eq!(f.entra.calls(), before + 3, "and again, now successfully");
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_is_honoured_by_the_refresh_retries() {
    let f = fixture(HOUR, "max_attempts = 1");
    f.get(None).await.unwrap();
    f.entra.set(Answer::Fail(Some(Duration::from_secs(120))));
    f.advance(HOUR / 2).await;
    assert_eq!(f.entra.calls(), 2);
    f.advance(Duration::from_secs(119)).await;
    assert_eq!(f.entra.calls(), 2, "not before Retry-After");
    f.advance(Duration::from_secs(1)).await;
    assert_eq!(f.entra.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_never_holds_the_refresh_past_the_tokens_safety_margin() {
    // Ten-minute tokens, refreshed at 4 to 5 minutes: a 5-minute Retry-After would let the
    // token expire (less its 60 s margin) first.
    let f = fixture(Duration::from_secs(600), "max_attempts = 1");
    f.get(None).await.unwrap();
    f.entra.set(Answer::Fail(Some(MAX_RETRY_AFTER)));
    f.advance(Duration::from_secs(300)).await;
    assert_eq!(f.entra.calls(), 2);
    // 300 s left, less the margin: retried within four minutes.
    f.advance(Duration::from_secs(240)).await;
    assert_eq!(f.entra.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_key_only_watched_stays_cached_and_refreshed_after_eviction() {
    let f = fixture(HOUR, "");
    let mut rx = f.watch().await;
    settle().await;
    let first = rx.borrow_and_update().token.clone().expect("a token");
    let key = f.broker.key("contoso", &[GRAPH.to_string()]).unwrap();
    // Evicted, as the cache does with a key no request has read for a day.
    f.broker.cache().evict(&key).await;
    f.advance(HOUR / 2).await;
    assert!(rx.has_changed().expect("the watch goes on"), "refreshed");
    let refreshed = rx.borrow_and_update().token.clone().expect("a token");
    assert_ne!(refreshed.fingerprint, first.fingerprint);
    // A request finds the watched slot again: its token, no fetch.
    let served = f.get(None).await.unwrap();
    assert_eq!(served.source, TokenSource::Cache);
    assert_eq!(served.token.fingerprint, refreshed.fingerprint);
    assert_eq!(f.entra.calls(), 2);
    // Once nobody watches, the slot is let go at its next refresh.
    drop(rx);
    f.advance(HOUR / 2).await;
    assert_eq!(f.broker.cache().watched_count().await, 0);
}

#[tokio::test(start_paused = true)]
async fn an_evicted_slot_still_held_is_not_refreshed() {
    let f = fixture(HOUR, "");
    f.get(None).await.unwrap();
    let key = f.broker.key("contoso", &[GRAPH.to_string()]).unwrap();
    // Held, as by a request under way when the cache evicted it.
    let held = f.broker.cache().existing(&key).await.expect("cached");
    f.broker.cache().evict(&key).await;
    f.advance(HOUR / 2).await;
    assert_eq!(
        f.entra.calls(),
        1,
        "no refresh for a key the cache let go of"
    );
    drop(held);
    // The key's next request fetches anew, and that token is refreshed.
    f.get(None).await.unwrap();
    assert_eq!(f.entra.calls(), 2);
    f.advance(HOUR / 2).await;
    assert_eq!(f.entra.calls(), 3);
}

/// The upstream failure a spawned `get` ends with once the fetch's budget is spent. The
/// attempt's timeout runs on tokio's paused clock, which moves on once every task waits; the
/// outer bound fails the test, rather than hanging it, if none is set.
async fn failure_after_the_budget(
    call: tokio::task::JoinHandle<Result<IssuedToken, BrokerError>>,
) -> Arc<FlowError> {
    let r = tokio::time::timeout(Duration::from_secs(3600), call)
        .await
        .expect("the caller is answered once the budget is spent")
        .unwrap();
    match r {
        Err(BrokerError::Upstream { source, .. }) => source,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_upstream_holds_a_cold_caller_no_longer_than_the_retry_budget() {
    let f = fixture(HOUR, "retry_budget_secs = 10");
    f.entra.set(Answer::Hang);
    let call = f.spawn_get();
    settle().await;
    assert_eq!(f.entra.calls(), 1);
    let source = failure_after_the_budget(call).await;
    let said = source.to_string();
    assert!(said.starts_with("Entra ID"), "{said}");
    assert!(said.contains("retry budget of 10s"), "{said}");
    assert!(source.is_retryable());
}

#[tokio::test(start_paused = true)]
async fn a_first_attempt_s_half_of_the_budget_runs_from_its_write_not_its_connection() {
    let f = fixture(HOUR, "retry_budget_secs = 10");
    // 4 s to get a connection (a cold burst's handshakes on a starved CPU), 4 s more for the
    // answer: past half the budget in all, but never silent for half of it.
    let s = Duration::from_secs;
    f.entra.set(Answer::Slow {
        connecting: s(4),
        answering: vec![s(4)],
    });
    let t = tokio::time::timeout(HOUR, f.get(None))
        .await
        .expect("answered")
        .expect("the first attempt's answer is taken");
    assert_eq!(t.source, TokenSource::Exchange);
    assert_eq!(f.entra.calls(), 1, "one exchange");
    assert_eq!(f.vault.signs.load(Ordering::SeqCst), 1, "one sign");
}

#[tokio::test(start_paused = true)]
async fn a_written_request_unanswered_for_half_the_budget_is_asked_again() {
    let f = fixture(HOUR, "retry_budget_secs = 10");
    let s = Duration::from_secs;
    // Written after 1 s, then silent (a pooled connection the network dropped); the retry
    // is answered at once.
    f.entra.set(Answer::Slow {
        connecting: s(1),
        answering: vec![HOUR, s(0)],
    });
    let t = tokio::time::timeout(HOUR, f.get(None))
        .await
        .expect("answered")
        .expect("the retry's answer is taken");
    assert_eq!(token_of(&t), "token-1");
    assert_eq!(f.entra.calls(), 2);
    assert_eq!(f.vault.signs.load(Ordering::SeqCst), 2, "a fresh assertion");
}

#[tokio::test(start_paused = true)]
async fn an_upstream_slower_than_half_the_budget_on_every_request_answers_the_first_attempt() {
    let f = fixture(HOUR, "retry_budget_secs = 10");
    // Every answer takes 6 s: the first attempt is asked again at 5 s, whose answer
    // would come at 11 s, past the budget.
    f.entra.set(Answer::Slow {
        connecting: Duration::ZERO,
        answering: vec![Duration::from_secs(6)],
    });
    let t = tokio::time::timeout(HOUR, f.get(None))
        .await
        .expect("answered")
        .expect("the first attempt's answer is taken");
    assert_eq!(token_of(&t), "token-0");
    assert_eq!(t.source, TokenSource::Exchange);
    assert_eq!(f.entra.calls(), 2, "the retry was sent");
    // Its answer, had the retry gone unanswered, was heard until the budget's end: after the
    // last retry's failure too.
    let f = fixture(HOUR, "retry_budget_secs = 10\nmax_attempts = 2");
    f.entra.set(Answer::Slow {
        connecting: Duration::ZERO,
        answering: vec![Duration::from_secs(6)],
    });
    let call = f.spawn_get();
    settle().await;
    assert_eq!(f.entra.calls(), 1);
    // The retry fails at once.
    f.entra.set(Answer::Fail(None));
    let t = tokio::time::timeout(HOUR, call)
        .await
        .expect("answered")
        .unwrap()
        .expect("the first attempt's answer is taken after the retry failed");
    assert_eq!(token_of(&t), "token-0");
    assert_eq!(f.entra.calls(), 2);
    // And while a retry that failed waits for the next (the default three attempts).
    let f = fixture(HOUR, "retry_budget_secs = 10");
    f.entra.set(Answer::Slow {
        connecting: Duration::ZERO,
        answering: vec![Duration::from_secs(6)],
    });
    let call = f.spawn_get();
    settle().await;
    // (The backoff runs on the broker's clock, which stands still here.)
    f.entra.set(Answer::Fail(Some(Duration::from_secs(2))));
    let t = tokio::time::timeout(HOUR, call)
        .await
        .expect("answered")
        .unwrap()
        .expect("the first attempt's answer is taken during the retry's backoff");
    assert_eq!(token_of(&t), "token-0");
    assert_eq!(f.entra.calls(), 2, "heard before a third attempt");
}

#[tokio::test(start_paused = true)]
async fn a_retry_whose_fresh_assertion_fails_leaves_the_first_attempt_to_answer() {
    let f = fixture(HOUR, "retry_budget_secs = 10\nmax_attempts = 2");
    f.entra.set(Answer::Slow {
        connecting: Duration::ZERO,
        answering: vec![Duration::from_secs(7)],
    });
    // Key Vault signs the first assertion, then fails (503) every sign after.
    f.vault.signs_ok.store(1, Ordering::SeqCst);
    let call = f.spawn_get();
    // Past half the budget: the retry's sign failed once and waits (on the broker's clock)
    // for its own retry, which fails too once that clock moves.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    assert_eq!(f.vault.signs.load(Ordering::SeqCst), 2);
    f.advance(Duration::from_secs(1)).await;
    assert_eq!(f.vault.signs.load(Ordering::SeqCst), 3);
    let t = tokio::time::timeout(HOUR, call)
        .await
        .expect("answered")
        .unwrap()
        .expect("the first attempt's answer, not Key Vault's failure");
    assert_eq!(token_of(&t), "token-0");
    assert_eq!(f.entra.calls(), 1, "the retry never reached Entra");
}

#[tokio::test(start_paused = true)]
async fn a_first_attempt_cut_off_and_asked_again_is_not_counted_by_the_breaker() {
    // One failure opens the breaker: counted, the cut-off would refuse its own retry.
    let f = fixture(HOUR, "retry_budget_secs = 10\nbreaker_failures = 1");
    let s = Duration::from_secs;
    f.entra.set(Answer::Slow {
        connecting: s(0),
        answering: vec![HOUR, s(0)],
    });
    let t = tokio::time::timeout(HOUR, f.get(None))
        .await
        .expect("answered")
        .expect("the retry is let through and answered");
    assert_eq!(token_of(&t), "token-1");
    // Unanswered retries are the upstream's failures: the next cold key's opens it.
    f.entra.set(Answer::Hang);
    let other = f.broker.get_token(TokenRequest {
        scopes: vec!["https://vault.azure.net/.default".into()],
        ..contoso(None, false)
    });
    let e = tokio::time::timeout(HOUR, other).await.expect("answered");
    assert!(e.is_err());
    let calls = f.entra.calls();
    let refused = tokio::time::timeout(HOUR, f.get_forced())
        .await
        .expect("answered");
    assert!(
        format!("{refused:?}").contains("circuit open"),
        "{refused:?}"
    );
    assert_eq!(f.entra.calls(), calls, "not asked while open");
}

#[tokio::test(start_paused = true)]
async fn a_budget_spent_on_a_hung_retry_names_the_failure_before_it() {
    let f = fixture(HOUR, "retry_budget_secs = 10\nmax_attempts = 5");
    f.entra.set(Answer::Fail(None));
    let call = f.spawn_get();
    settle().await;
    assert_eq!(f.entra.calls(), 1);
    // The retry hangs until the budget ends it.
    f.entra.set(Answer::Hang);
    f.advance(Duration::from_secs(1)).await;
    assert_eq!(f.entra.calls(), 2);
    let said = failure_after_the_budget(call).await.to_string();
    assert!(said.contains("retry budget of 10s"), "{said}");
    assert!(said.contains("; the attempt before failed: "), "{said}");
    assert!(said.contains("503"), "{said}");
}

#[tokio::test(start_paused = true)]
async fn a_certificate_re_read_that_hangs_leaves_the_sign_and_exchange_their_budget() {
    // Three-hour tokens: no scheduled refresh (at about half their life) comes first.
    let f = Arc::new(fixture(3 * HOUR, "retry_budget_secs = 10"));
    f.get(None).await.unwrap();
    assert_eq!(f.entra.calls(), 1);
    // The certificate metadata is due for a re-read (hourly), and Key Vault's certificate
    // reads stop answering; signs still work.
    f.advance(HOUR + Duration::from_secs(1)).await;
    f.vault.hang.store(true, Ordering::SeqCst);
    let asking = f.clone();
    let call = tokio::spawn(async move { asking.get_forced().await });
    let r = tokio::time::timeout(Duration::from_secs(3600), call)
        .await
        .expect("answered")
        .unwrap();
    let t = r.expect("the held certificate is used once its re-read is given up");
    assert_eq!(t.source, TokenSource::Exchange);
    assert_eq!(f.entra.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_refresh_due_at_once_is_held_to_the_floor_and_the_chain_goes_on() {
    for (lifetime, refresh_in) in [(HOUR, Some(Duration::ZERO)), (Duration::ZERO, None)] {
        let f = fixture(HOUR, "");
        f.entra.set(Answer::Token {
            lifetime,
            refresh_in,
        });
        let _ = f.get(None).await;
        settle().await;
        assert_eq!(
            f.entra.calls(),
            1,
            "{lifetime:?} {refresh_in:?}: no refresh at once"
        );
        for n in 2..=4 {
            f.advance(crate::flow::MIN_REFRESH).await;
            assert_eq!(
                f.entra.calls(),
                n,
                "{lifetime:?} {refresh_in:?}: the chain goes on"
            );
        }
        // Entra comes back to its senses: the next refresh brings a token callers can use.
        f.entra.set(Answer::hourly());
        f.advance(crate::flow::MIN_REFRESH).await;
        assert_eq!(f.get(None).await.unwrap().source, TokenSource::Cache);
    }
}

#[tokio::test(start_paused = true)]
async fn a_fetch_longer_than_its_tokens_refresh_time_is_refreshed_after_it_ends() {
    let f = fixture(HOUR, "retry_budget_secs = 120\nmax_attempts = 5");
    // Entra throttles for 40 s, then issues a token to refresh 30 s after the request: due
    // before the fetch has even ended.
    f.entra.set(Answer::Fail(Some(Duration::from_secs(40))));
    let get = f.spawn_get();
    settle().await;
    f.entra.set(Answer::Token {
        lifetime: HOUR,
        refresh_in: Some(crate::flow::MIN_REFRESH),
    });
    f.advance(Duration::from_secs(41)).await;
    get.await.unwrap().unwrap();
    assert_eq!(f.entra.calls(), 2, "the refresh waits for the fetch to end");
    f.advance(Duration::from_secs(2)).await;
    assert_eq!(f.entra.calls(), 3, "then it is made");
    f.advance(crate::flow::MIN_REFRESH).await;
    assert_eq!(f.entra.calls(), 4, "and the chain goes on");
}

#[tokio::test(start_paused = true)]
async fn entras_refusal_of_the_key_is_reported_even_when_the_certificate_reread_fails() {
    let f = fixture(HOUR, "max_attempts = 1");
    f.entra.set(Answer::RejectKey);
    // Refused once with Key Vault up: the certificate is read (and re-read, unchanged).
    assert!(f.get(None).await.is_err());
    // Past the negative cache, with Key Vault down: the held certificate signs, Entra
    // refuses it again, and the re-read fails.
    f.advance(Duration::from_secs(31)).await;
    f.vault.down.store(true, Ordering::SeqCst);
    match f.get(None).await {
        Err(BrokerError::Upstream { source, .. }) => {
            let said = source.to_string();
            assert!(
                matches!(&*source, FlowError::Entra(e) if e.codes == [700027]),
                "{said}"
            );
            assert!(said.contains("AADSTS700027"), "{said}");
            assert!(said.contains("re-reading the certificate"), "{said}");
            assert!(said.contains("503 from the vault"), "{said}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn during_an_outage_the_old_token_is_served_down_to_the_safety_margin_unless_more_was_asked_for()
 {
    let f = fixture(HOUR, "max_attempts = 1");
    let first = f.get(None).await.unwrap();
    f.entra.set(Answer::Fail(None));
    // Past its refresh point (about half its life) refreshes fail: served, marked stale.
    f.advance(Duration::from_secs(2400)).await;
    let stale = f.get(None).await.unwrap();
    assert_eq!(stale.source, TokenSource::StaleWhileRefreshFailing);
    assert_eq!(token_of(&stale), token_of(&first));
    // A caller that needs more than its 20 minutes left gets the outage, not the token.
    assert!(matches!(
        f.get(Some(1500)).await,
        Err(BrokerError::Upstream { .. })
    ));
    // Within 5 minutes of its expiry: a caller that asked for those 5 minutes gets the
    // outage, and so does a forced refresh (not the token it asked to replace).
    f.advance(Duration::from_secs(1200 - 299)).await;
    assert!(matches!(
        f.get(Some(300)).await,
        Err(BrokerError::Upstream { .. })
    ));
    assert!(matches!(
        f.get_forced().await,
        Err(BrokerError::Upstream { .. })
    ));
    // A caller that asked for no minimum is still served it, down to the safety margin.
    for left in [299, 60] {
        f.advance(Duration::from_secs(f.left(&first) - left)).await;
        let stale = f.get(None).await.unwrap();
        assert_eq!(
            stale.source,
            TokenSource::StaleWhileRefreshFailing,
            "{left}s left"
        );
        assert_eq!(token_of(&stale), token_of(&first));
    }
    // Below it, nobody gets it.
    f.advance(Duration::from_secs(1)).await;
    assert!(matches!(
        f.get(None).await,
        Err(BrokerError::Upstream { .. })
    ));
    // Entra back: a new token at once.
    f.entra.set(Answer::hourly());
    f.advance(Duration::from_secs(61)).await;
    let fresh = f.get(None).await.unwrap();
    assert_ne!(token_of(&fresh), token_of(&first));
}

#[tokio::test(start_paused = true)]
async fn callers_served_through_an_outage_start_no_fetch_and_wait_for_none() {
    let f = fixture(HOUR, "max_attempts = 1");
    f.get(None).await.unwrap();
    f.entra.set(Answer::Fail(None));
    // The refresh and its retries fail; 200 s are left, less than the default minimum.
    f.advance(Duration::from_secs(3400)).await;
    let stats = f.broker.stats();
    let (calls, misses, stale) = (
        f.entra.calls(),
        stats.misses.get(),
        stats.stale_served.get(),
    );
    // The refresh's last failure is held off: served at once.
    for _ in 0..10 {
        let t = f.get(None).await.unwrap();
        assert_eq!(t.source, TokenSource::StaleWhileRefreshFailing);
    }
    // Past the hold-off, the refresh's next retry hangs: still served at once, not joined
    // to the retry under way.
    f.entra.set(Answer::Hang);
    f.advance(Duration::from_secs(61)).await;
    assert_eq!(f.entra.calls(), calls + 1, "the refresh's retry");
    for _ in 0..10 {
        let t = f.get(None).await.unwrap();
        assert_eq!(t.source, TokenSource::StaleWhileRefreshFailing);
    }
    assert_eq!(f.entra.calls(), calls + 1, "no fetch of the callers' own");
    assert_eq!(stats.misses.get(), misses, "nor a wait for the refresh's");
    assert_eq!(stats.stale_served.get(), stale + 20);
}

#[tokio::test(start_paused = true)]
async fn a_refresh_found_failing_by_a_callers_wait_serves_it_the_cached_token() {
    // Refreshed at 2900 s, while the token still meets the default minimum.
    let f = fixture(HOUR, "max_attempts = 1");
    f.entra.set(Answer::Token {
        lifetime: HOUR,
        refresh_in: Some(Duration::from_secs(2900)),
    });
    let first = f.get(None).await.unwrap();
    // Entra stops answering: the refresh waits for its budget, and before it has failed
    // the token falls below the default minimum.
    f.entra.set(Answer::Hang);
    f.advance(Duration::from_secs(2900)).await;
    assert_eq!(f.entra.calls(), 2);
    f.advance(Duration::from_secs(450)).await;
    assert!(
        f.broker
            .cache()
            .iter()
            .all(|(_, s)| s.current().failure.is_none())
    );
    // A caller that asked for no minimum waits for the refresh under way, and when that
    // fails is served the cached token.
    let t = f.get(None).await.unwrap();
    assert_eq!(t.source, TokenSource::StaleWhileRefreshFailing);
    assert_eq!(token_of(&t), token_of(&first));
    assert_eq!(
        f.broker.stats().coalesced.get(),
        1,
        "it waited for the refresh"
    );
    assert_eq!(f.entra.calls(), 2, "and made no fetch of its own");
}

#[tokio::test(start_paused = true)]
async fn each_request_counts_once_as_a_hit_a_miss_or_a_negative_hit() {
    let f = fixture(HOUR, "max_attempts = 1");
    let stats = f.broker.stats();
    let counts = || {
        (
            stats.hits.get(),
            stats.misses.get(),
            stats.negative_hits.get(),
            stats.stale_served.get(),
        )
    };
    f.entra.set(Answer::Token {
        lifetime: HOUR,
        refresh_in: Some(Duration::from_secs(2900)),
    });
    f.get(None).await.unwrap();
    f.get(None).await.unwrap();
    assert_eq!(counts(), (1, 1, 0, 0));
    // The refresh hangs until the token is below the default minimum: a caller waits for
    // it, and when it fails is answered from the cache, a hit (and a stale serve).
    f.entra.set(Answer::Hang);
    f.advance(Duration::from_secs(2900)).await;
    f.advance(Duration::from_secs(450)).await;
    let t = f.get(None).await.unwrap();
    assert_eq!(t.source, TokenSource::StaleWhileRefreshFailing);
    assert_eq!(stats.coalesced.get(), 1, "it waited for the refresh");
    assert_eq!(counts(), (2, 1, 0, 1));
    // A caller that asked for more than the token has waits for a fetch, and is a miss
    // though it gives up before the answer.
    f.advance(Duration::from_secs(5)).await;
    let broker = f.broker.clone();
    let asking = tokio::spawn(async move { broker.get_token(contoso(Some(600), false)).await });
    settle().await;
    assert!(!asking.is_finished());
    asking.abort();
    let _ = asking.await;
    assert_eq!(counts(), (2, 2, 0, 1));
}

#[tokio::test(start_paused = true)]
async fn a_token_whose_refresh_is_refused_for_good_is_not_served_below_the_default_minimum() {
    let f = fixture(HOUR, "");
    f.get(None).await.unwrap();
    // The app is disabled: the token is served while it meets the default minimum...
    f.entra.set(Answer::Refuse);
    f.advance(Duration::from_secs(2400)).await;
    assert_eq!(
        f.get(None).await.unwrap().source,
        TokenSource::StaleWhileRefreshFailing
    );
    // ... and then the refusal and its fix, not the token's last minutes.
    f.advance(Duration::from_secs(1000)).await;
    match f.get(None).await {
        Err(BrokerError::Upstream { source, .. }) => assert!(source.is_persistent()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_transient_failure_is_shared_by_the_keys_callers_for_its_hold_off() {
    let f = fixture(HOUR, "max_attempts = 1");
    // No Retry-After: held off for the floor.
    f.entra.set(Answer::Fail(None));
    assert!(f.get(None).await.is_err());
    assert_eq!(f.entra.calls(), 1);
    for _ in 0..5 {
        match f.get(None).await {
            Err(BrokerError::Upstream { source, .. }) => assert!(source.is_retryable()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(f.entra.calls(), 1, "shared, not fetched again");
    assert_eq!(f.broker.stats().negative_hits.get(), 5);
    f.advance(TRANSIENT_HOLD).await;
    f.entra.set(Answer::Fail(Some(Duration::from_secs(40))));
    assert!(f.get(None).await.is_err());
    assert_eq!(
        f.entra.calls(),
        2,
        "fetched again once the hold-off is over"
    );
    // A Retry-After holds the callers off for its length.
    f.advance(Duration::from_secs(39)).await;
    assert!(f.get(None).await.is_err());
    assert_eq!(f.entra.calls(), 2);
    f.entra.set(Answer::hourly());
    f.advance(Duration::from_secs(1)).await;
    assert_eq!(f.get(None).await.unwrap().source, TokenSource::Exchange);
    assert_eq!(f.entra.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_held_failures_callers_are_told_the_time_left_of_its_hold_off() {
    let f = fixture(HOUR, "max_attempts = 1");
    let hint = |r: Result<IssuedToken, BrokerError>| match r {
        Err(e @ BrokerError::Upstream { .. }) => {
            let s = crate::api::error::to_status(&e);
            s.metadata()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        }
        other => panic!("{other:?}"),
    };
    f.entra.set(Answer::Fail(Some(Duration::from_secs(40))));
    assert_eq!(hint(f.get(None).await).as_deref(), Some("40"));
    // Partway through: the time left, rounded up to whole seconds.
    f.advance(Duration::from_millis(15_500)).await;
    assert_eq!(hint(f.get(None).await).as_deref(), Some("25"));
    f.advance(Duration::from_millis(24_200)).await;
    assert_eq!(hint(f.get(None).await).as_deref(), Some("1"));
    assert_eq!(f.entra.calls(), 1, "held, not fetched again");
    // Without a Retry-After: the floor's time left, at least a second.
    f.advance(Duration::from_secs(1)).await;
    f.entra.set(Answer::Fail(None));
    assert!(f.get(None).await.is_err());
    assert_eq!(f.entra.calls(), 2);
    f.advance(Duration::from_millis(1_900)).await;
    assert_eq!(hint(f.get(None).await).as_deref(), Some("1"));
    assert_eq!(f.entra.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn failed_fetches_are_counted_by_who_started_them() {
    let f = fixture(
        HOUR,
        "max_attempts = 1\n[cache]\nforce_refresh_interval_secs = 0",
    );
    f.get(None).await.unwrap();
    f.entra.set(Answer::Fail(None));
    let stats = f.broker.stats();
    // A forced refresh is the caller's.
    assert!(f.get_forced().await.is_err());
    assert_eq!(stats.caller_fetch_failures.get(), 1);
    assert_eq!(stats.refresh_failures.get(), 0);
    // The scheduled refresh fails (its retries too): the broker's own fetches.
    f.advance(HOUR / 2).await;
    assert_eq!(
        f.get(None).await.unwrap().source,
        TokenSource::StaleWhileRefreshFailing
    );
    assert!(stats.refresh_failures.get() >= 1);
    assert_eq!(stats.caller_fetch_failures.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn failed_fetches_are_logged_at_most_twenty_a_second_then_the_count_held_back() {
    let log = crate::telemetry::CapturedLog::default();
    // The runtime has one thread: the fetch tasks log through this subscriber too.
    let _log = log.install();
    let f = fixture(HOUR, "max_attempts = 1");
    f.entra.set(Answer::Fail(None));
    // An outage failing 25 keys within one second.
    let key = |i: u32| TokenRequest {
        tenant: "contoso".into(),
        scopes: vec![format!("https://r{i}.example.com/.default")],
        min_validity: None,
        force_refresh: false,
        claims: None,
    };
    for i in 0..25 {
        assert!(f.broker.get_token(key(i)).await.is_err());
    }
    let lines = || log.text();
    assert_eq!(
        lines().matches("token fetch failed").count(),
        20,
        "{}",
        lines()
    );
    assert!(!lines().contains("not logged"), "{}", lines());
    // The next second: the count of lines held back, then the line.
    f.advance(Duration::from_secs(1)).await;
    assert!(f.broker.get_token(key(25)).await.is_err());
    let logged = lines();
    assert_eq!(logged.matches("token fetch failed").count(), 21, "{logged}");
    assert!(
        logged.contains("token fetch failures not logged") && logged.contains("not_logged=5"),
        "{logged}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_fetch_before_the_refresh_is_due_leaves_the_token_healthy() {
    let f = fixture(
        HOUR,
        "max_attempts = 1\n[cache]\nforce_refresh_interval_secs = 0",
    );
    let first = f.get(None).await.unwrap();
    f.entra.set(Answer::Fail(None));
    // A forced refresh, and an early fetch for more validity than the token has left.
    assert!(f.get_forced().await.is_err());
    f.advance(TRANSIENT_HOLD).await;
    assert!(f.get(Some(3599)).await.is_err());
    assert_eq!(f.entra.calls(), 3, "both were fetched");
    let t = f.get(None).await.unwrap();
    assert_eq!(t.source, TokenSource::Cache);
    assert_eq!(token_of(&t), token_of(&first));
    assert_eq!(f.broker.stats().stale_served.get(), 0);
    // Its scheduled refresh failing is what makes it stale.
    f.advance(HOUR / 2).await;
    assert_eq!(
        f.get(None).await.unwrap().source,
        TokenSource::StaleWhileRefreshFailing
    );
}

#[tokio::test(start_paused = true)]
async fn the_brokers_identity_refused_to_a_half_open_probe_leaves_key_vaults_breaker_half_open() {
    let f = fixture(
        HOUR,
        "max_attempts = 1\nbreaker_failures = 2\nbreaker_cool_down_secs = 5",
    );
    let get = |scope: &str| {
        f.broker.get_token(TokenRequest {
            tenant: "contoso".into(),
            scopes: vec![scope.into()],
            min_validity: None,
            force_refresh: false,
            claims: None,
        })
    };
    // Two failed certificate reads open the vault's breaker.
    f.vault.down.store(true, Ordering::SeqCst);
    assert!(get("api://a/.default").await.is_err());
    assert!(get("api://b/.default").await.is_err());
    // After the cool-down the probe's identity is refused before Key Vault is asked: no
    // word on Key Vault's health.
    f.advance(Duration::from_secs(6)).await;
    f.vault.down.store(false, Ordering::SeqCst);
    f.vault.identity_refused.store(true, Ordering::SeqCst);
    assert!(get("api://c/.default").await.is_err());
    f.vault.identity_refused.store(false, Ordering::SeqCst);
    // Key Vault is still down: the next call is the probe again, and its failure reopens
    // the breaker, so the one after is refused without asking Key Vault.
    f.vault.down.store(true, Ordering::SeqCst);
    assert!(get("api://d/.default").await.is_err());
    match get("api://e/.default").await {
        Err(e) => assert!(e.to_string().contains("circuit open"), "{e}"),
        other => panic!("{other:?}"),
    }
}

/// The status a caller of `contoso` gets for `r`, a failure.
fn status_of(r: Result<IssuedToken, BrokerError>) -> tonic::Status {
    match r {
        Err(e) => crate::api::error::to_status(&e),
        Ok(t) => panic!("served {:?}", t.source),
    }
}

#[tokio::test(start_paused = true)]
async fn a_remembered_refusals_callers_are_told_how_long_it_is_remembered() {
    let f = fixture(HOUR, "max_attempts = 1\nnegative_ttl_secs = 300");
    f.entra.set(Answer::Refuse);
    let told = "(remembered: this tenant and these scopes are not asked for again for";
    // The first answer, whose fetch was refused, is remembered for the whole period.
    let s = status_of(f.get(None).await);
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    assert!(
        s.message()
            .ends_with(&format!("{told} 5m 0s; SIGHUP the broker to ask at once)")),
        "{}",
        s.message()
    );
    // Partway through: the time left, rounded up to whole seconds.
    f.advance(Duration::from_millis(49_500)).await;
    let s = status_of(f.get(None).await);
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    assert!(
        s.message().contains(&format!("{told} 4m 11s;")),
        "{}",
        s.message()
    );
    assert_eq!(
        s.message().matches("correlation id").count(),
        1,
        "Entra's words once: {}",
        s.message()
    );
    assert!(s.metadata().get("retry-after").is_none(), "{s:?}");
    f.advance(Duration::from_secs(250)).await;
    let s = status_of(f.get(None).await);
    assert!(
        s.message().contains(&format!("{told} 1s;")),
        "{}",
        s.message()
    );
    assert_eq!(f.entra.calls(), 1, "remembered, not asked again");
    // A held transient failure tells its time left as its retry-after only.
    f.advance(Duration::from_secs(1)).await;
    f.entra.set(Answer::Fail(Some(Duration::from_secs(40))));
    for _ in 0..2 {
        let s = status_of(f.get(None).await);
        assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
        assert!(!s.message().contains("remembered"), "{}", s.message());
    }
    assert_eq!(f.entra.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_not_remembered_is_not_said_to_be() {
    let f = fixture(HOUR, "max_attempts = 1\nnegative_ttl_secs = 0");
    f.entra.set(Answer::Refuse);
    let s = status_of(f.get(None).await);
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    assert!(!s.message().contains("remembered"), "{}", s.message());
}

#[tokio::test(start_paused = true)]
async fn forgotten_refusals_are_asked_again_at_once_and_a_watched_key_retries_promptly() {
    let f = fixture(HOUR, "max_attempts = 1\nnegative_ttl_secs = 300");
    f.entra.set(Answer::Refuse);
    assert!(f.get(None).await.is_err());
    let rx = f.watch().await;
    settle().await;
    assert_eq!(f.entra.calls(), 1, "remembered");
    // The app is fixed; the operator sends SIGHUP. No time passes.
    f.entra.set(Answer::hourly());
    assert_eq!(f.broker.forget_refusals().await, 1);
    settle().await;
    assert_eq!(f.entra.calls(), 2, "the watched key's task fetched at once");
    assert!(rx.borrow().token.is_some());
    assert_eq!(f.get(None).await.unwrap().source, TokenSource::Cache);
    assert_eq!(f.broker.forget_refusals().await, 0, "nothing left");
}

#[tokio::test(start_paused = true)]
async fn a_refresh_refused_for_good_is_tried_again_at_once_when_forgotten() {
    let f = fixture(HOUR, "max_attempts = 1\nnegative_ttl_secs = 300");
    f.get(None).await.unwrap();
    f.entra.set(Answer::Refuse);
    f.advance(Duration::from_secs(1800)).await;
    assert_eq!(f.entra.calls(), 2, "the refresh was refused");
    // Past its backoff's wait: now waiting for the remembered refusal to end.
    f.advance(Duration::from_secs(5)).await;
    assert_eq!(f.entra.calls(), 2);
    f.entra.set(Answer::hourly());
    assert_eq!(f.broker.forget_refusals().await, 1);
    settle().await;
    assert_eq!(f.entra.calls(), 3, "the refresh chain asked again at once");
    assert!(f.broker.get_token(contoso(None, false)).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_refresh_refused_for_good_is_tried_again_at_once_when_forgotten_during_its_backoff() {
    let f = fixture(HOUR, "max_attempts = 1\nnegative_ttl_secs = 300");
    f.get(None).await.unwrap();
    f.entra.set(Answer::Refuse);
    f.advance(Duration::from_secs(1800)).await;
    assert_eq!(f.entra.calls(), 2, "the refresh was refused");
    // Still in the backoff's wait (up to 2 s) after the refusal: no time passes.
    f.entra.set(Answer::hourly());
    assert_eq!(f.broker.forget_refusals().await, 1);
    settle().await;
    assert_eq!(f.entra.calls(), 3, "the refresh chain asked again at once");
}

#[tokio::test(start_paused = true)]
async fn a_refusal_asked_for_before_refusals_are_forgotten_is_not_remembered_after() {
    let f = fixture(HOUR, "max_attempts = 1\nnegative_ttl_secs = 300");
    // A fetch is under way, its request sent while the app is still disabled...
    let gate = Arc::new(tokio::sync::Notify::new());
    f.entra.set(Answer::RefuseWhen(gate.clone()));
    let asking = f.spawn_get();
    settle().await;
    assert_eq!(f.entra.calls(), 1);
    // ... when the operator fixes it and sends SIGHUP; then the refusal comes back.
    f.entra.set(Answer::hourly());
    assert_eq!(f.broker.forget_refusals().await, 0);
    gate.notify_one();
    settle().await;
    let s = status_of(asking.await.unwrap());
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    assert!(!s.message().contains("remembered"), "{}", s.message());
    // The answer to a request from before the SIGHUP is not remembered past it: the next
    // caller asks again at once.
    assert_eq!(f.get(None).await.unwrap().source, TokenSource::Exchange);
    assert_eq!(f.entra.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn forgetting_refusals_leaves_a_held_transient_failure_held() {
    let f = fixture(HOUR, "max_attempts = 1");
    f.entra.set(Answer::Fail(Some(Duration::from_secs(40))));
    assert!(f.get(None).await.is_err());
    f.entra.set(Answer::hourly());
    assert_eq!(f.broker.forget_refusals().await, 0);
    let s = status_of(f.get(None).await);
    assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
    assert_eq!(
        f.entra.calls(),
        1,
        "still held: the upstream asked for 40 s"
    );
}

#[tokio::test(start_paused = true)]
async fn a_forced_refresh_during_a_refresh_outage_gets_the_failure_until_its_interval_is_spent() {
    let f = fixture(HOUR, "max_attempts = 1");
    let first = f.get(None).await.unwrap();
    let failed = |r: Result<IssuedToken, BrokerError>| match r {
        Err(BrokerError::Upstream { source, .. }) => assert!(source.is_retryable()),
        other => panic!("{other:?}"),
    };
    // The scheduled refresh (due by 1800 s) fails; its failure is held off for 2 s.
    f.entra.set(Answer::Fail(None));
    f.advance(HOUR / 2).await;
    assert_eq!(f.entra.calls(), 2);
    // Forced callers share the held failure, without a fetch: neither spends the interval.
    failed(f.get_forced().await);
    failed(f.get_forced().await);
    assert_eq!(f.entra.calls(), 2);
    // The hold-off over (the refresh's next retry not yet due): a forced refresh fetches.
    let slot = f.slot().await;
    slot.set_negative(None);
    failed(f.get_forced().await);
    assert_eq!(f.entra.calls(), 3);
    // Within the interval (30 s) no forced refresh fetches again: once no failure is held,
    // the cached token is the answer, and its source says the key's refresh is failing.
    failed(f.get_forced().await);
    slot.set_negative(None);
    let t = f.get_forced().await.unwrap();
    assert_eq!(t.source, TokenSource::StaleWhileRefreshFailing);
    assert_eq!(token_of(&t), token_of(&first));
    assert_eq!(f.entra.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_forced_refresh_joins_the_fetch_under_way_even_within_its_interval() {
    let f = fixture(
        HOUR,
        "max_attempts = 1\n[cache]\nforce_refresh_interval_secs = 3600",
    );
    f.get(None).await.unwrap();
    // The interval's (an hour's) forced refresh.
    let forced = f.get_forced().await.unwrap();
    assert_eq!(forced.source, TokenSource::Exchange);
    // Within it, with no fetch under way: the cached token, said to be cached.
    let cached = f.get_forced().await.unwrap();
    assert_eq!(cached.source, TokenSource::Cache);
    assert_eq!(token_of(&cached), token_of(&forced));
    assert_eq!(f.entra.calls(), 2);
    // The scheduled refresh is under way, Entra slow to answer: a forced caller joins it,
    // rather than being answered at once with the token it asked to replace.
    let gate = Arc::new(tokio::sync::Notify::new());
    f.entra.set(Answer::Wait(gate.clone(), HOUR));
    f.advance(HOUR / 2).await;
    assert_eq!(f.entra.calls(), 3);
    let asking = f.spawn_forced();
    settle().await;
    assert!(!asking.is_finished(), "answered before the fetch under way");
    gate.notify_one();
    settle().await;
    let t = asking.await.unwrap().unwrap();
    assert_eq!(t.source, TokenSource::Exchange);
    assert_eq!(token_of(&t), "token-2");
    // A fetch under way that fails: the forced caller gets its failure.
    f.entra.set(Answer::Hang);
    f.advance(HOUR / 2).await;
    assert_eq!(f.entra.calls(), 4);
    match f.get_forced().await {
        Err(BrokerError::Upstream { source, .. }) => assert!(source.is_retryable()),
        other => panic!("{other:?}"),
    }
    assert_eq!(f.entra.calls(), 4, "joined, not fetched again");
}

#[tokio::test(start_paused = true)]
async fn an_early_fetch_for_more_validity_joins_the_fetch_under_way_without_spending_its_interval()
{
    let f = fixture(
        HOUR,
        "max_attempts = 1\n[cache]\nforce_refresh_interval_secs = 86400",
    );
    let gate = Arc::new(tokio::sync::Notify::new());
    // A request for `min_validity` seconds, in a task of its own, answered once the fetch
    // under way (Entra slow to answer) is let through.
    let joining = |min_validity: u64| {
        let broker = f.broker.clone();
        let gate = gate.clone();
        async move {
            let asking =
                tokio::spawn(
                    async move { broker.get_token(contoso(Some(min_validity), false)).await },
                );
            settle().await;
            assert!(!asking.is_finished(), "answered before the fetch under way");
            gate.notify_one();
            settle().await;
            asking.await.unwrap()
        }
    };
    f.get(None).await.unwrap();
    // The scheduled refresh is under way: a caller wanting more than the cached token has
    // joins it, its token the answer.
    f.entra.set(Answer::Wait(gate.clone(), HOUR));
    f.advance(HOUR / 2).await;
    assert_eq!(f.entra.calls(), 2);
    let t = joining(3000).await.unwrap();
    assert_eq!(t.source, TokenSource::Exchange);
    assert_eq!(token_of(&t), "token-1");
    assert_eq!(f.entra.calls(), 2, "joined, not fetched again");
    // Joining did not spend the interval: the next early fetch is the caller's own.
    f.entra.set(Answer::hourly());
    f.advance(Duration::from_secs(100)).await;
    let t = f.get(Some(3550)).await.unwrap();
    assert_eq!(t.source, TokenSource::Exchange);
    assert_eq!(f.entra.calls(), 3);
    // Within the interval now spent, a fetch under way is still joined.
    f.entra.set(Answer::Wait(gate.clone(), HOUR));
    f.advance(HOUR / 2).await;
    assert_eq!(f.entra.calls(), 4);
    let t = joining(3000).await.unwrap();
    assert_eq!(t.source, TokenSource::Exchange);
    assert_eq!(token_of(&t), "token-3");
    // A joined token that does not meet the minimum: refused as ever, with what it has.
    f.entra
        .set(Answer::Wait(gate.clone(), Duration::from_secs(2000)));
    f.advance(HOUR / 2).await;
    assert_eq!(f.entra.calls(), 5);
    match joining(3000).await {
        Err(BrokerError::MinValidityUnmet { remaining, wanted }) => {
            assert_eq!(remaining, Duration::from_secs(2000));
            assert_eq!(wanted, Duration::from_secs(3000));
        }
        other => panic!("{other:?}"),
    }
    // A fetch under way that fails: the caller gets its failure.
    f.entra.set(Answer::Hang);
    f.advance(Duration::from_secs(1000)).await;
    assert_eq!(f.entra.calls(), 6);
    match f.get(Some(1500)).await {
        Err(BrokerError::Upstream { source, .. }) => assert!(source.is_retryable()),
        other => panic!("{other:?}"),
    }
    assert_eq!(f.entra.calls(), 6, "joined, not fetched again");
}

#[tokio::test(start_paused = true)]
async fn a_replaced_tokens_refresh_ends_with_its_replacement() {
    let f = fixture(HOUR, "\n[cache]\nforce_refresh_interval_secs = 0");
    // Nothing else runs on this test's runtime between requests: the one live task is the
    // refresh timetable's runner.
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    f.get(None).await.unwrap();
    settle().await;
    assert_eq!((f.broker.scheduled_refreshes(), tasks()), (1, 1));
    // Tokens replaced early, by forced refreshes and an early fetch for more validity.
    for _ in 0..10 {
        f.get_forced().await.unwrap();
    }
    f.advance(Duration::from_secs(10)).await;
    assert_eq!(
        f.get(Some(3595)).await.unwrap().source,
        TokenSource::Exchange
    );
    settle().await;
    assert_eq!(
        (f.broker.scheduled_refreshes(), tasks()),
        (1, 1),
        "one refresh for the key, not one per token"
    );
    assert_eq!(f.entra.calls(), 12);
    // The last token's entry refreshes it, and the new token has one of its own.
    f.advance(HOUR / 2).await;
    assert_eq!(f.entra.calls(), 13);
    settle().await;
    assert_eq!((f.broker.scheduled_refreshes(), tasks()), (1, 1));
    // Evicted, its slot held by nobody: its entry goes with it.
    f.broker
        .cache()
        .evict(&f.broker.key("contoso", &[GRAPH.into()]).unwrap())
        .await;
    // The cache lets go of the evicted slot on its own schedule, in real time (under load,
    // after the paused clock's settling): waited for, bounded.
    for _ in 0..400 {
        if f.broker.scheduled_refreshes() == 0 {
            break;
        }
        settle().await;
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!((f.broker.scheduled_refreshes(), tasks()), (0, 1));
    // The broker gone, its runner ends.
    drop(f);
    settle().await;
    assert_eq!(tasks(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_early_fetch_for_more_validity_shares_a_held_failure_without_spending_its_interval() {
    let f = fixture(HOUR, "max_attempts = 1");
    f.get(None).await.unwrap();
    // The scheduled refresh (due by 1800 s) fails; its failure is held off for 2 s.
    f.entra.set(Answer::Fail(None));
    f.advance(HOUR / 2).await;
    assert_eq!(f.entra.calls(), 2);
    // Callers wanting more validity than the cached token has share the held failure,
    // without a fetch, as forced callers do: neither spends the interval.
    for _ in 0..2 {
        match f.get(Some(3000)).await {
            Err(BrokerError::Upstream { source, .. }) => assert!(source.is_retryable()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(f.entra.calls(), 2);
    // The hold-off over (the refresh's next retry not yet due): the early fetch is made,
    // its interval unspent.
    f.slot().await.set_negative(None);
    f.entra.set(Answer::hourly());
    let t = f.get(Some(3000)).await.unwrap();
    assert_eq!(t.source, TokenSource::Exchange);
    assert_eq!(f.entra.calls(), 3);
}

/// A request for `contoso`'s Graph token answering a claims challenge.
fn challenged(claims: &str) -> TokenRequest {
    TokenRequest {
        claims: Some(Claims::parse(claims).unwrap()),
        ..contoso(None, false)
    }
}

const NBF: &str = r#"{"access_token":{"nbf":{"essential":true,"value":"1700000000"}}}"#;
const NBF_LATER: &str = r#"{"access_token":{"nbf":{"essential":true,"value":"1700000999"}}}"#;

#[tokio::test(start_paused = true)]
async fn a_tenant_opted_in_sends_cp1_and_one_not_opted_in_sends_no_claims() {
    let f = fixture(HOUR, "");
    f.get(None).await.unwrap();
    assert_eq!(f.entra.last_claims(), None);
    let f = fixture_cae(HOUR, "");
    f.get(None).await.unwrap();
    assert_eq!(
        f.entra.last_claims(),
        Some(serde_json::json!({"access_token": {"xms_cc": {"values": ["cp1"]}}}))
    );
    // Its refreshes too.
    f.advance(HOUR / 2).await;
    assert_eq!(f.entra.calls(), 2);
    assert_eq!(
        f.entra.last_claims(),
        Some(serde_json::json!({"access_token": {"xms_cc": {"values": ["cp1"]}}}))
    );
}

#[tokio::test(start_paused = true)]
async fn a_claims_challenge_fetches_a_token_with_its_claims_that_replaces_the_cached_one() {
    let f = fixture_cae(HOUR, "");
    let first = f.get(None).await.unwrap();
    let t = f.broker.get_token(challenged(NBF)).await.unwrap();
    assert_eq!(t.source, TokenSource::Exchange);
    assert_ne!(token_of(&t), token_of(&first));
    assert_eq!(f.entra.calls(), 2);
    assert_eq!(
        f.entra.last_claims(),
        Some(serde_json::json!({"access_token": {
            "nbf": {"essential": true, "value": "1700000000"},
            "xms_cc": {"values": ["cp1"]},
        }}))
    );
    // Later callers get the new token from the cache.
    let later = f.get(None).await.unwrap();
    assert_eq!(later.source, TokenSource::Cache);
    assert_eq!(token_of(&later), token_of(&t));
    // Its refresh, when due, sends the tenant's capabilities alone again.
    f.advance(HOUR / 2).await;
    assert_eq!(f.entra.calls(), 3);
    assert_eq!(
        f.entra.last_claims(),
        Some(serde_json::json!({"access_token": {"xms_cc": {"values": ["cp1"]}}}))
    );
    // Without the opt-in, the challenge's claims alone are sent.
    let f = fixture(HOUR, "");
    f.get(None).await.unwrap();
    f.broker.get_token(challenged(NBF)).await.unwrap();
    assert_eq!(
        f.entra.last_claims(),
        Some(serde_json::from_str::<serde_json::Value>(NBF).unwrap())
    );
}

#[tokio::test(start_paused = true)]
async fn claims_challenges_within_the_forced_refresh_interval_cost_one_exchange() {
    let f = fixture_cae(HOUR, "[cache]\nforce_refresh_interval_secs = 30");
    f.get(None).await.unwrap();
    let fresh = f.broker.get_token(challenged(NBF)).await.unwrap();
    assert_eq!(fresh.source, TokenSource::Exchange);
    // Within the interval, the same challenge or another, or a forced refresh: the cached
    // token, said to be cached.
    for req in [challenged(NBF), challenged(NBF_LATER), contoso(None, true)] {
        let t = f.broker.get_token(req).await.unwrap();
        assert_eq!(t.source, TokenSource::Cache);
        assert_eq!(token_of(&t), token_of(&fresh));
    }
    assert_eq!(f.entra.calls(), 2);
    // Once it has passed, the next challenge fetches.
    f.advance(Duration::from_secs(31)).await;
    let t = f.broker.get_token(challenged(NBF_LATER)).await.unwrap();
    assert_eq!(t.source, TokenSource::Exchange);
    assert_eq!(f.entra.calls(), 3);
    assert_eq!(
        f.entra.last_claims().unwrap()["access_token"]["nbf"]["value"],
        "1700000999"
    );
}

#[tokio::test(start_paused = true)]
async fn a_claims_challenge_joins_only_a_fetch_carrying_the_same_claims() {
    let f = fixture_cae(HOUR, "[cache]\nforce_refresh_interval_secs = 0");
    f.get(None).await.unwrap();
    let gate = Arc::new(tokio::sync::Notify::new());
    f.entra.set(Answer::Wait(gate.clone(), HOUR));
    let spawn = |req: TokenRequest| {
        let broker = f.broker.clone();
        tokio::spawn(async move { broker.get_token(req).await })
    };
    let first = spawn(challenged(NBF));
    settle().await;
    assert_eq!(f.entra.calls(), 2);
    // The same claims, and a forced refresh without any, join the fetch under way.
    let same = spawn(challenged(NBF));
    let forced = f.spawn_forced();
    // Other claims wait for it, then fetch with their own.
    let other = spawn(challenged(NBF_LATER));
    settle().await;
    assert_eq!(f.entra.calls(), 2, "one fetch at a time");
    gate.notify_one();
    settle().await;
    let first = first.await.unwrap().unwrap();
    for joined in [same.await.unwrap().unwrap(), forced.await.unwrap().unwrap()] {
        assert_eq!(joined.source, TokenSource::Exchange);
        assert_eq!(token_of(&joined), token_of(&first));
    }
    assert_eq!(f.entra.calls(), 3, "the other claims' own fetch");
    assert_eq!(
        f.entra.last_claims().unwrap()["access_token"]["nbf"]["value"],
        "1700000999"
    );
    gate.notify_one();
    settle().await;
    let other = other.await.unwrap().unwrap();
    assert_eq!(other.source, TokenSource::Exchange);
    assert_ne!(token_of(&other), token_of(&first));
    // A refresh under way carries no claims: a challenge waits for it too, then fetches.
    f.advance(HOUR / 2).await;
    assert_eq!(f.entra.calls(), 4, "the refresh");
    let after = spawn(challenged(NBF));
    settle().await;
    assert_eq!(f.entra.calls(), 4);
    gate.notify_one();
    settle().await;
    assert_eq!(f.entra.calls(), 5);
    gate.notify_one();
    settle().await;
    let after = after.await.unwrap().unwrap();
    assert_eq!(token_of(&after), "token-4");
    assert!(f.entra.last_claims().unwrap()["access_token"]["nbf"].is_object());
}

#[tokio::test(start_paused = true)]
async fn a_claims_challenge_on_a_cold_key_fetches_with_its_claims() {
    let f = fixture_cae(HOUR, "");
    let t = f.broker.get_token(challenged(NBF)).await.unwrap();
    assert_eq!(t.source, TokenSource::Exchange);
    assert_eq!(f.entra.calls(), 1);
    assert!(f.entra.last_claims().unwrap()["access_token"]["nbf"].is_object());
}

#[tokio::test(start_paused = true)]
async fn entras_refusal_of_a_claims_fetch_is_not_remembered_for_the_keys_other_callers() {
    let f = fixture_cae(
        HOUR,
        "max_attempts = 1\n[cache]\nforce_refresh_interval_secs = 0",
    );
    let first = f.get(None).await.unwrap();
    f.entra.set(Answer::Refuse);
    match f.broker.get_token(challenged(NBF)).await {
        Err(e @ BrokerError::Upstream { .. }) => assert!(e.is_persistent(), "{e}"),
        other => panic!("{other:?}"),
    }
    let slot = f.slot().await;
    assert!(slot.negative(f.clock.moment()).is_none(), "not remembered");
    // The key's other callers are served as before, and a forced refresh asks Entra.
    let t = f.get(None).await.unwrap();
    assert_eq!(token_of(&t), token_of(&first));
    f.entra.set(Answer::hourly());
    let forced = f.get_forced().await.unwrap();
    assert_eq!(forced.source, TokenSource::Exchange);
    assert_eq!(f.entra.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_refused_claims_fetch_is_not_published_as_the_keys_failure() {
    let f = fixture_cae(HOUR, "max_attempts = 1");
    f.entra.set(Answer::Refuse);
    assert!(f.broker.get_token(challenged(NBF)).await.is_err());
    // The key's callers and watchers are not told it fails: the refusal answered that
    // caller.
    assert!(f.slot().await.current().failure.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_refresh_come_due_during_a_refused_claims_fetch_fetches_on_its_own() {
    let f = Arc::new(fixture_cae(
        HOUR,
        "max_attempts = 1\n[cache]\nforce_refresh_interval_secs = 0",
    ));
    let first = f.get(None).await.unwrap();
    // A caller's claims fetch is under way when the key's refresh comes due (1440 to
    // 1800 s); Entra refuses those claims.
    f.advance(Duration::from_secs(1400)).await;
    let gate = Arc::new(tokio::sync::Notify::new());
    f.entra.set(Answer::RefuseWhen(gate.clone()));
    let challenged_call = {
        let broker = f.broker.clone();
        tokio::spawn(async move { broker.get_token(challenged(NBF)).await })
    };
    settle().await;
    assert_eq!(f.entra.calls(), 2);
    f.advance(Duration::from_secs(401)).await;
    f.entra.set(Answer::hourly());
    gate.notify_one();
    assert!(challenged_call.await.unwrap().is_err());
    settle().await;
    // The refusal was that caller's answer, not the key's refresh failing: the refresh
    // fetched on its own, and the key's callers and watchers are not told it fails.
    let t = f.get(None).await.unwrap();
    assert_eq!(t.source, TokenSource::Cache, "{t:?}");
    assert_ne!(token_of(&t), token_of(&first));
    assert_eq!(f.entra.calls(), 3);
    assert!(f.slot().await.current().failure.is_none());
}

/// `req` in a task of its own.
fn spawn_req(
    f: &Fixture,
    req: TokenRequest,
) -> tokio::task::JoinHandle<Result<IssuedToken, BrokerError>> {
    let broker = f.broker.clone();
    tokio::spawn(async move { broker.get_token(req).await })
}

/// Whether `r` is Entra's refusal (a configuration error).
fn is_refusal(r: &Result<IssuedToken, BrokerError>) -> bool {
    matches!(r, Err(e @ BrokerError::Upstream { .. }) if e.is_persistent())
}

#[tokio::test(start_paused = true)]
async fn a_caller_without_claims_that_joined_a_refused_claims_fetch_fetches_on_its_own() {
    let f = fixture_cae(HOUR, "max_attempts = 1");
    // A cold key: a caller's claims fetch is under way, and Entra will refuse those claims.
    let gate = Arc::new(tokio::sync::Notify::new());
    f.entra.set(Answer::RefuseWhen(gate.clone()));
    let challenged_call = spawn_req(&f, challenged(NBF));
    settle().await;
    assert_eq!(f.entra.calls(), 1);
    // A plain caller and one with the same claims join it.
    let plain = f.spawn_get();
    let same = spawn_req(&f, challenged(NBF));
    settle().await;
    assert_eq!(f.entra.calls(), 1, "joined");
    f.entra.set(Answer::hourly());
    gate.notify_one();
    settle().await;
    // The refusal answers the callers who sent those claims; the plain caller, who sent
    // none, looked again and fetched its own token.
    assert!(is_refusal(&challenged_call.await.unwrap()));
    assert!(is_refusal(&same.await.unwrap()));
    let t = plain.await.unwrap().unwrap();
    assert_eq!(t.source, TokenSource::Exchange);
    assert_eq!(token_of(&t), "token-1");
    assert_eq!(f.entra.calls(), 2);
    assert_eq!(
        f.entra.last_claims(),
        Some(serde_json::json!({"access_token": {"xms_cc": {"values": ["cp1"]}}}))
    );
}

#[tokio::test(start_paused = true)]
async fn a_forced_refresh_that_joined_a_refused_claims_fetch_looks_again_by_its_interval() {
    let f = fixture_cae(
        HOUR,
        "max_attempts = 1\n[cache]\nforce_refresh_interval_secs = 0",
    );
    let first = f.get(None).await.unwrap();
    // Less left than the early fetch below asks for.
    f.advance(Duration::from_secs(200)).await;
    let gate = Arc::new(tokio::sync::Notify::new());
    f.entra.set(Answer::RefuseWhen(gate.clone()));
    let challenged_call = spawn_req(&f, challenged(NBF));
    settle().await;
    assert_eq!(f.entra.calls(), 2);
    // A forced refresh and an early fetch for more validity join the claims fetch.
    let forced = f.spawn_forced();
    let early = spawn_req(&f, contoso(Some(3500), false));
    settle().await;
    assert_eq!(f.entra.calls(), 2, "joined");
    f.entra.set(Answer::hourly());
    gate.notify_one();
    settle().await;
    assert!(is_refusal(&challenged_call.await.unwrap()));
    // Each looked again: one fetch of its own, which the other joined or was served.
    for t in [
        forced.await.unwrap().unwrap(),
        early.await.unwrap().unwrap(),
    ] {
        assert_ne!(token_of(&t), token_of(&first));
        assert_eq!(t.source, TokenSource::Exchange, "{t:?}");
    }
    assert_eq!(f.entra.calls(), 3);

    // Within the interval the claims fetch spent, the forced refresh that joined it is
    // answered as any other: the cached token.
    let f = fixture_cae(
        HOUR,
        "max_attempts = 1\n[cache]\nforce_refresh_interval_secs = 30",
    );
    let first = f.get(None).await.unwrap();
    f.entra.set(Answer::RefuseWhen(gate.clone()));
    let challenged_call = spawn_req(&f, challenged(NBF));
    settle().await;
    let forced = f.spawn_forced();
    settle().await;
    gate.notify_one();
    settle().await;
    assert!(is_refusal(&challenged_call.await.unwrap()));
    let t = forced.await.unwrap().unwrap();
    assert_eq!(t.source, TokenSource::Cache);
    assert_eq!(token_of(&t), token_of(&first));
    assert_eq!(f.entra.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_remembered_before_the_refresh_is_due_is_not_asked_again_by_a_caller() {
    let f = fixture(HOUR, "negative_ttl_secs = 600");
    let first = f.get(None).await.unwrap();
    // The app is disabled; a forced refresh before the token's refresh is due (1440 to
    // 1800 s) is refused and remembered for the negative period (until 2000 s).
    f.advance(Duration::from_secs(1400)).await;
    f.entra.set(Answer::Refuse);
    assert!(f.get_forced().await.is_err());
    assert_eq!(f.entra.calls(), 2);
    // The refresh comes due within the period: neither the chain nor a caller asks again.
    f.advance(Duration::from_secs(401)).await;
    let t = f.get(None).await.unwrap();
    assert_eq!(token_of(&t), token_of(&first));
    settle().await;
    assert_eq!(f.entra.calls(), 2, "asked again within the negative period");
    // Once the period is over, the refresh asks again.
    f.advance(Duration::from_secs(200)).await;
    assert_eq!(f.entra.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_new_key_is_cached_when_the_cache_is_full_of_keys_read_more_often() {
    let f = fixture(HOUR, "\n[cache]\nmax_entries = 20");
    let request = |resource: &str| TokenRequest {
        tenant: "contoso".into(),
        scopes: vec![format!("https://{resource}/.default")],
        min_validity: None,
        force_refresh: false,
        claims: None,
    };
    // Twenty keys, each read many times: the cache is full.
    for _ in 0..20 {
        for i in 0..20 {
            f.broker
                .get_token(request(&format!("r{i}.example")))
                .await
                .unwrap();
        }
    }
    f.broker.cache().housekeeping().await;
    let before = f.entra.calls();
    // A new key: fetched once, its fetch shared by the callers that come while it is under
    // way, then cached like any other, whatever the cache held.
    let gate = Arc::new(tokio::sync::Notify::new());
    f.entra.set(Answer::Wait(gate.clone(), HOUR));
    let spawn = || {
        let broker = f.broker.clone();
        tokio::spawn(async move { broker.get_token(request("new.example")).await })
    };
    let early = spawn();
    settle().await;
    f.broker.cache().housekeeping().await;
    let late = spawn();
    settle().await;
    gate.notify_waiters();
    let first = early.await.unwrap().unwrap();
    assert_eq!(token_of(&late.await.unwrap().unwrap()), token_of(&first));
    assert_eq!(f.entra.calls(), before + 1);
    for _ in 0..5 {
        f.broker.cache().housekeeping().await;
        let again = f.broker.get_token(request("new.example")).await.unwrap();
        assert_eq!(again.source, TokenSource::Cache);
        assert_eq!(token_of(&again), token_of(&first));
    }
    assert_eq!(
        f.entra.calls(),
        before + 1,
        "fetched again for every request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_arriving_as_a_fetch_ends_start_no_other() {
    // A caller that looked at the key just before its fetch published, and asks for a fetch
    // just after it ended, must not start another: one exchange per key for a cold burst.
    for round in 0..1500 {
        let f = fixture(HOUR, "");
        let callers: Vec<_> = (0..3)
            .map(|_| {
                let broker = f.broker.clone();
                tokio::spawn(async move {
                    for _ in 0..3 {
                        broker.get_token(contoso(None, false)).await.unwrap();
                    }
                })
            })
            .collect();
        for c in callers {
            c.await.unwrap();
        }
        assert_eq!(f.entra.calls(), 1, "round {round}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_refresh_due_while_a_refusal_is_remembered_is_told_as_failing() {
    let f = fixture(HOUR, "negative_ttl_secs = 3600");
    let rx = f.watch().await;
    settle().await;
    assert!(rx.borrow().token.is_some());
    // A forced refresh before the refresh is due (1440 to 1800 s) is refused and
    // remembered for an hour.
    f.advance(Duration::from_secs(1400)).await;
    f.entra.set(Answer::Refuse);
    assert!(f.get_forced().await.is_err());
    assert!(rx.borrow().failure.is_none(), "the token is healthy yet");
    // Its refresh comes due: it waits out the refusal, and says its refresh is refused
    // rather than leaving the token to run out unannounced.
    f.advance(Duration::from_secs(401)).await;
    assert_eq!(f.entra.calls(), 2);
    let state = rx.borrow().clone();
    assert!(
        state
            .failure
            .as_deref()
            .is_some_and(|e| e.contains("7000112")),
        "{:?}",
        state.failure
    );
    assert!(!state.failure_transient);
    assert_eq!(
        f.get(None).await.unwrap().source,
        TokenSource::StaleWhileRefreshFailing
    );
}
