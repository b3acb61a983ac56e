// tokenbroker's Azure resources, in one resource group:
//   - a Key Vault (Premium: HSM-backed keys) with RBAC authorization, purge protection,
//     no public network access, and a private endpoint with its private DNS zone
//     (keyvault.bicep);
//   - the broker's user-assigned managed identity, federated with the AKS service
//     account system:serviceaccount:<namespace>:<serviceAccount> (identity.bicep);
//   - the identity's one role on the vault, a custom role with the two data actions the
//     broker uses: certificates/read and keys/sign/action. Nothing else: no secrets, no
//     key export, no other key operation, no management plane. Creating the role needs
//     Microsoft.Authorization/roleDefinitions/write on the resource group (Owner or User
//     Access Administrator), as the assignment does.
// Certificates are not Bicep resources: create them with deploy/azure/certificate-policy.json
// as shown in docs/DEPLOY.md.
//
//   az deployment group create -g <rg> -f deploy/azure/main.bicep -p @my.parameters.json
//   (start from main.parameters.example.json)
//
// No Bicep compiler exists on the project's CI machines: CI scans these files with
// checkov (which parses them) and they stay simple enough to review by eye.

targetScope = 'resourceGroup'

@description('Region of all resources.')
param location string = resourceGroup().location

@description('Key Vault name: globally unique, 3-24 characters.')
@minLength(3)
@maxLength(24)
param vaultName string

@description('Name of the broker\'s user-assigned managed identity.')
param identityName string = 'id-tokenbroker'

@description('The AKS cluster\'s OIDC issuer URL: az aks show -g <rg> -n <cluster> --query oidcIssuerProfile.issuerUrl -o tsv')
param aksOidcIssuerUrl string

@description('Kubernetes namespace and service account of the broker (deploy/kubernetes).')
param serviceAccountNamespace string = 'tokenbroker'
param serviceAccountName string = 'tokenbroker'

@description('Resource id of the subnet for the vault\'s private endpoint (the NetworkPolicy admits 443 to this subnet only).')
param privateEndpointSubnetId string

@description('Resource id of the VNet the private DNS zone is linked to (the AKS cluster\'s VNet).')
param vnetId string

@description('Log Analytics workspace for the vault\'s audit log (the audit category group: every sign and certificate read). Required.')
@minLength(1)
param logAnalyticsWorkspaceId string

@description('Resource id of an existing privatelink.vaultcore.azure.net private DNS zone (e.g. in a hub), already linked to the cluster\'s VNet; empty: create the zone in this resource group and link it to vnetId.')
param privateDnsZoneId string = ''

param tags object = {
  app: 'tokenbroker'
}

module identity 'identity.bicep' = {
  name: 'tokenbroker-identity'
  params: {
    location: location
    identityName: identityName
    aksOidcIssuerUrl: aksOidcIssuerUrl
    serviceAccountNamespace: serviceAccountNamespace
    serviceAccountName: serviceAccountName
    tags: tags
  }
}

// The vault, its private endpoint and DNS, its audit log, and the identity's role on it.
module vault 'keyvault.bicep' = {
  name: 'tokenbroker-keyvault'
  params: {
    location: location
    vaultName: vaultName
    privateEndpointSubnetId: privateEndpointSubnetId
    vnetId: vnetId
    logAnalyticsWorkspaceId: logAnalyticsWorkspaceId
    privateDnsZoneId: privateDnsZoneId
    brokerPrincipalId: identity.outputs.principalId
    tags: tags
  }
}


@description('The ServiceAccount annotation azure.workload.identity/client-id (overlays/aks/serviceaccount-patch.yaml).')
output identityClientId string = identity.outputs.clientId
@description('vault_url of every tenant credential in the broker config.')
output vaultUri string = vault.outputs.vaultUri
