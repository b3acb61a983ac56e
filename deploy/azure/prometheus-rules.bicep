// Alert rules for the broker's metrics in Azure Monitor managed service for Prometheus.
// AKS's managed Prometheus does not read PrometheusRule objects from the cluster: its rules
// are Azure resources (prometheusRuleGroups) on the Azure Monitor workspace the cluster's
// metrics go to. The scrape itself is the PodMonitor of
// deploy/kubernetes/components/managed-prometheus. Deployed on its own, in the
// workspace's resource group:
//
//   az deployment group create -g <workspace rg> -f deploy/azure/prometheus-rules.bicep \
//     -p azureMonitorWorkspaceId=<workspace id> aksClusterId=<cluster id> actionGroupId=<action group id>
//
// tokenbroker_certificate_expiry_seconds (per tenant, each replica's last read of the
// signing certificate; negative once expired): Key Vault renews 60 days before the end, so
// a certificate within 30 days of it was not renewed (or is an HSM certificate, never
// renewed by itself), and the broker logs a warning from then on (docs/DEPLOY.md).
// tokenbroker_server_certificate_expiry_seconds: the listener's TLS certificate in use, which
// cert-manager renews 30 days before its end.
// The health group: the audit trail failing or losing records, configuration files the
// broker refused (the old policy or trust staying in force), tokens served stale or near
// their end, open circuit breakers, failing requests, and TLS handshakes clients refuse.

targetScope = 'resourceGroup'

@description('Region of the rule group: the Azure Monitor workspace\'s region.')
param location string = resourceGroup().location

@description('Resource id of the Azure Monitor workspace the cluster\'s managed Prometheus writes to.')
param azureMonitorWorkspaceId string

@description('Resource id of the AKS cluster (the rules see only its series).')
param aksClusterId string

@description('Action group to notify; empty: the alerts fire in Azure Monitor only.')
param actionGroupId string = ''

param tags object = {
  app: 'tokenbroker'
}

var clusterName = last(split(aksClusterId, '/'))
var actions = empty(actionGroupId) ? [] : [
  {
    actionGroupId: actionGroupId
  }
]

resource certificateRules 'Microsoft.AlertsManagement/prometheusRuleGroups@2023-03-01' = {
  name: 'tokenbroker-certificates-${clusterName}'
  location: location
  tags: tags
  properties: {
    description: 'tokenbroker: signing certificates near or past their end'
    scopes: [
      azureMonitorWorkspaceId
      aksClusterId
    ]
    clusterName: clusterName
    enabled: true
    interval: 'PT5M'
    rules: [
      {
        alert: 'TokenbrokerCertificateNotRenewed'
        expression: 'min by (tenant) (tokenbroker_certificate_expiry_seconds) < 30 * 86400'
        for: 'PT15M'
        severity: 2
        enabled: true
        labels: {
          app: 'tokenbroker'
        }
        annotations: {
          summary: 'A tokenbroker signing certificate ends within 30 days'
          description: 'Tenant {{ $labels.tenant }}: the signing certificate ends in {{ $value | humanizeDuration }}. Key Vault renews 60 days before the end: check its auto-renewal, then upload the new public part to the app registration (docs/DEPLOY.md, Certificate renewal).'
        }
        actions: actions
        resolveConfiguration: {
          autoResolved: true
          timeToResolve: 'PT10M'
        }
      }
      {
        alert: 'TokenbrokerCertificateExpiring'
        expression: 'min by (tenant) (tokenbroker_certificate_expiry_seconds) < 14 * 86400'
        for: 'PT15M'
        severity: 1
        enabled: true
        labels: {
          app: 'tokenbroker'
        }
        annotations: {
          summary: 'A tokenbroker signing certificate ends within 14 days'
          description: 'Tenant {{ $labels.tenant }}: the signing certificate ends in {{ $value | humanizeDuration }}; after that Entra refuses its assertions (AADSTS700027) and the tenant gets no tokens.'
        }
        actions: actions
        resolveConfiguration: {
          autoResolved: true
          timeToResolve: 'PT10M'
        }
      }
      {
        alert: 'TokenbrokerServerCertificateExpiring'
        expression: 'min(tokenbroker_server_certificate_expiry_seconds) < 14 * 86400'
        for: 'PT15M'
        severity: 1
        enabled: true
        labels: {
          app: 'tokenbroker'
        }
        annotations: {
          summary: 'The tokenbroker listener\'s TLS certificate ends within 14 days'
          description: 'The broker\'s TLS certificate ends in {{ $value | humanizeDuration }}; cert-manager renews it 30 days before the end, so check the Certificate tokenbroker-tls (kubectl -n tokenbroker describe certificate tokenbroker-tls). Once it has ended, callers refuse every connection.'
        }
        actions: actions
        resolveConfiguration: {
          autoResolved: true
          timeToResolve: 'PT10M'
        }
      }
    ]
  }
}

resource healthRules 'Microsoft.AlertsManagement/prometheusRuleGroups@2023-03-01' = {
  name: 'tokenbroker-health-${clusterName}'
  location: location
  tags: tags
  properties: {
    description: 'tokenbroker: audit trail, refused configuration, failing refreshes and upstreams, TLS'
    scopes: [
      azureMonitorWorkspaceId
      aksClusterId
    ]
    clusterName: clusterName
    enabled: true
    interval: 'PT1M'
    rules: [
      {
        alert: 'TokenbrokerAuditFailing'
        expression: 'max(tokenbroker_audit_failing) > 0'
        for: 'PT2M'
        severity: 1
        enabled: true
        labels: {
          app: 'tokenbroker'
        }
        annotations: {
          summary: 'The tokenbroker audit trail cannot be written'
          description: 'A replica cannot write its audit trail (a full disk, a failing or closed output): it refuses tokens with UNAVAILABLE and reports not ready, unless [audit] on_write_failure = \'serve\'. Check the audit output named in the configuration and the broker\'s log (docs/SECURITY.md, Audit).'
        }
        actions: actions
        resolveConfiguration: {
          autoResolved: true
          timeToResolve: 'PT10M'
        }
      }
      {
        alert: 'TokenbrokerAuditRecordsLost'
        expression: 'sum(increase(tokenbroker_audit_records_lost_total[15m])) > 0'
        severity: 1
        enabled: true
        labels: {
          app: 'tokenbroker'
        }
        annotations: {
          summary: 'tokenbroker audit records were lost'
          description: '{{ $value }} audit records lost in 15 minutes: the audit output failed for longer than 64 MiB of records could be kept. The trail has a gap; find the output\'s failure in the broker\'s log.'
        }
        actions: actions
        resolveConfiguration: {
          autoResolved: true
          timeToResolve: 'PT10M'
        }
      }
      {
        alert: 'TokenbrokerPolicyFileRefused'
        expression: 'max(tokenbroker_policy_file_refused) > 0'
        for: 'PT10M'
        severity: 1
        enabled: true
        labels: {
          app: 'tokenbroker'
        }
        annotations: {
          summary: 'The tokenbroker policy file holds a policy the broker refused'
          description: 'The policy file is invalid or unreadable, so the previous policy stays in force: grants revoked in the file are still granted. The broker\'s log and tokenbroker check-config name the problem.'
        }
        actions: actions
        resolveConfiguration: {
          autoResolved: true
          timeToResolve: 'PT10M'
        }
      }
      {
        alert: 'TokenbrokerClientTrustRefused'
        expression: 'max(tokenbroker_client_trust_refused) > 0'
        for: 'PT10M'
        severity: 1
        enabled: true
        labels: {
          app: 'tokenbroker'
        }
        annotations: {
          summary: 'The tokenbroker client CA bundles or revocation lists were refused'
          description: 'The client CA bundles or revocation lists hold a set the broker refused: the trust loaded before stays in force, so certificates revoked in the new lists are still accepted. The broker\'s log names the file.'
        }
        actions: actions
        resolveConfiguration: {
          autoResolved: true
          timeToResolve: 'PT10M'
        }
      }
      {
        alert: 'TokenbrokerServerCertificateRefused'
        expression: 'max(tokenbroker_server_certificate_refused) > 0'
        for: 'PT30M'
        severity: 2
        enabled: true
        labels: {
          app: 'tokenbroker'
        }
        annotations: {
          summary: 'The tokenbroker listener\'s new TLS certificate was refused'
          description: 'The listener\'s certificate and key files hold a pair the broker refused (unreadable, not matching, or outside its validity): the certificate loaded before stays in use until it ends. The broker\'s log says why.'
        }
        actions: actions
        resolveConfiguration: {
          autoResolved: true
          timeToResolve: 'PT10M'
        }
      }
      {
        alert: 'TokenbrokerServingStaleTokens'
        expression: 'sum(increase(tokenbroker_cache_stale_served_total[10m])) > 0'
        for: 'PT10M'
        severity: 2
        enabled: true
        labels: {
          app: 'tokenbroker'
        }
        annotations: {
          summary: 'tokenbroker is serving cached tokens while their refresh fails'
          description: 'Refreshes of cached tokens are failing (Key Vault, Entra ID or the managed identity), and callers are served the tokens cached before, which end at their expiry. tokenbroker_upstream_calls_total{result="error"} and the broker\'s log name the upstream and its error code.'
        }
        actions: actions
        resolveConfiguration: {
          autoResolved: true
          timeToResolve: 'PT10M'
        }
      }
      {
        alert: 'TokenbrokerTokensNearExpiry'
        expression: 'min by (tenant) (tokenbroker_token_expiry_seconds) < 600'
        for: 'PT5M'
        severity: 1
        enabled: true
        labels: {
          app: 'tokenbroker'
        }
        annotations: {
          summary: 'A tenant\'s cached tokens end within 10 minutes'
          description: 'Tenant {{ $labels.tenant }}: its soonest cached token ends in {{ $value | humanizeDuration }}; refresh ahead of expiry has not replaced it, so its callers will be refused once it ends (or sooner, at the safety margin). The broker\'s log names the failure and its AADSTS code.'
        }
        actions: actions
        resolveConfiguration: {
          autoResolved: true
          timeToResolve: 'PT10M'
        }
      }
      {
        alert: 'TokenbrokerBreakerOpen'
        expression: 'max by (upstream, target) (tokenbroker_breaker_state) == 2'
        for: 'PT5M'
        severity: 2
        enabled: true
        labels: {
          app: 'tokenbroker'
        }
        annotations: {
          summary: 'A tokenbroker circuit breaker is open'
          description: 'Calls to {{ $labels.upstream }} at {{ $labels.target }} are refused by the broker\'s circuit breaker after repeated failures; cold keys of that target get UNAVAILABLE until a trial call succeeds.'
        }
        actions: actions
        resolveConfiguration: {
          autoResolved: true
          timeToResolve: 'PT10M'
        }
      }
      {
        alert: 'TokenbrokerRequestsFailing'
        expression: 'sum(rate(tokenbroker_requests_total{code=~"UNAVAILABLE|INTERNAL|DEADLINE_EXCEEDED"}[10m])) / sum(rate(tokenbroker_requests_total[10m])) > 0.05'
        for: 'PT10M'
        severity: 2
        enabled: true
        labels: {
          app: 'tokenbroker'
        }
        annotations: {
          summary: 'More than 5% of tokenbroker requests fail on the broker\'s or an upstream\'s side'
          description: '{{ $value | humanizePercentage }} of requests end UNAVAILABLE, INTERNAL or DEADLINE_EXCEEDED (their caller\'s deadline passed while the broker waited). tokenbroker_upstream_calls_total by code and the broker\'s log say which upstream fails.'
        }
        actions: actions
        resolveConfiguration: {
          autoResolved: true
          timeToResolve: 'PT10M'
        }
      }
      {
        alert: 'TokenbrokerCallersRefuseServerCertificate'
        expression: 'sum(increase(tokenbroker_tls_handshakes_refused_total{reason="client_alert"}[15m])) > 10'
        severity: 2
        enabled: true
        labels: {
          app: 'tokenbroker'
        }
        annotations: {
          summary: 'Clients end TLS handshakes with tokenbroker with an alert'
          description: '{{ $value }} handshakes in 15 minutes were ended by the client with an alert, most often because it does not trust the broker\'s certificate: check the certificate served after a rotation and the CA bundle callers trust.'
        }
        actions: actions
        resolveConfiguration: {
          autoResolved: true
          timeToResolve: 'PT10M'
        }
      }
      {
        alert: 'TokenbrokerHandshakesOverCapacity'
        expression: 'sum(increase(tokenbroker_tls_handshakes_refused_total{reason="over_capacity"}[10m])) > 0'
        severity: 3
        enabled: true
        labels: {
          app: 'tokenbroker'
        }
        annotations: {
          summary: 'tokenbroker closed connections at once: too many TLS handshakes in progress'
          description: '{{ $value }} connections in 10 minutes were closed because 256 handshakes were in progress: a reconnection storm, or a flood of connections that never finish their handshake.'
        }
        actions: actions
        resolveConfiguration: {
          autoResolved: true
          timeToResolve: 'PT10M'
        }
      }
    ]
  }
}

output ruleGroupId string = certificateRules.id
output healthRuleGroupId string = healthRules.id
