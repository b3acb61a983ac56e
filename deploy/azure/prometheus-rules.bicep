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

output ruleGroupId string = certificateRules.id
