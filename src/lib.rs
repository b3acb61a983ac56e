//! tokenbroker: Entra ID access tokens for many tenants, with client assertions signed
//! by Azure Key Vault, cached and served over gRPC. The broker holds no secrets.
//!
//! See `docs/ARCHITECTURE.md` for the map of modules and the invariants.
#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod api;
pub mod assertion;
pub mod audit;
pub mod authn;
#[cfg(feature = "emulator")]
pub mod bench;
pub mod broker;
pub mod cache;
pub mod claims;
pub mod cli;
pub mod clock;
pub mod config;
#[cfg(feature = "emulator")]
pub mod dev;
#[cfg(feature = "emulator")]
pub mod emulator;
pub mod entra;
pub mod flow;
pub mod identity;
pub mod limits;
pub mod lines;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod probe;
pub mod resilience;
pub mod sensitive;
pub mod server;
pub mod signer;
pub mod striped;
pub mod telemetry;
pub mod timetable;
pub mod tls;
pub mod watched;

pub mod proto {
    //! Generated gRPC types for `tokenbroker.v1`.
    #![allow(clippy::all, missing_docs, unreachable_pub)]
    tonic::include_proto!("tokenbroker.v1");
    /// Encoded file descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tokenbroker_descriptor");

    /// Everything but the token, which is shown by its fingerprint: a response printed with
    /// `{:?}` (a log line, a failed assertion, a panic) must not carry it.
    impl std::fmt::Debug for GetTokenResponse {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("GetTokenResponse")
                .field(
                    "access_token",
                    &crate::sensitive::fingerprint(self.access_token.as_bytes()),
                )
                .field("token_type", &self.token_type)
                .field("expires_at", &self.expires_at)
                .field("refresh_at", &self.refresh_at)
                .field("tenant_id", &self.tenant_id)
                .field("client_id", &self.client_id)
                .field("scopes", &self.scopes)
                .field("source", &self.source)
                .finish()
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_response_printed_with_debug_shows_the_tokens_fingerprint_not_the_token() {
        let token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
        let r = crate::proto::GetTokenResponse {
            access_token: token.into(),
            tenant_id: "contoso-id".into(),
            ..Default::default()
        };
        let watched = crate::proto::WatchTokenResponse {
            token: Some(r.clone()),
            ..Default::default()
        };
        for text in [format!("{r:?}"), format!("{watched:?}"), format!("{r:#?}")] {
            assert!(!text.contains("eyJ"), "{text}");
            assert!(text.contains(crate::sensitive::fingerprint(token.as_bytes()).as_str()));
            assert!(text.contains("contoso-id"), "{text}");
        }
    }
}
