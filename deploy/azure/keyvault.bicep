// The broker's Key Vault: Premium (keys in HSMs), RBAC authorization (no access
// policies), soft delete with purge protection, reachable only through a private
// endpoint whose name resolves through the privatelink.vaultcore.azure.net zone
// linked to the cluster's VNet (or an existing zone); its audit log; and the broker
// identity's one role on the vault, a custom role with the two data actions it uses.

param location string
param vaultName string
param privateEndpointSubnetId string
param vnetId string
@description('Log Analytics workspace for the vault\'s audit log (required).')
param logAnalyticsWorkspaceId string
@description('Resource id of an existing privatelink.vaultcore.azure.net zone (e.g. a hub\'s); empty: create one here, linked to vnetId.')
param privateDnsZoneId string = ''
@description('Principal (object) id of the broker\'s managed identity.')
param brokerPrincipalId string
param tags object

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: vaultName
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'premium'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    enabledForDeployment: false
    enabledForDiskEncryption: false
    enabledForTemplateDeployment: false
    publicNetworkAccess: 'Disabled'
    networkAcls: {
      bypass: 'None'
      defaultAction: 'Deny'
    }
  }
}

// The zone is created (and linked to the cluster's VNet) only when no existing zone is
// given: a zone of that name usually exists once per organisation, in a hub, already
// linked to the spoke VNets by whoever owns it.
var createDnsZone = empty(privateDnsZoneId)
var dnsZoneId = createDnsZone ? resourceId('Microsoft.Network/privateDnsZones', 'privatelink.vaultcore.azure.net') : privateDnsZoneId

resource dnsZone 'Microsoft.Network/privateDnsZones@2020-06-01' = if (createDnsZone) {
  name: 'privatelink.vaultcore.azure.net'
  location: 'global'
  tags: tags
}

resource dnsLink 'Microsoft.Network/privateDnsZones/virtualNetworkLinks@2020-06-01' = if (createDnsZone) {
  parent: dnsZone
  name: '${vaultName}-vnet-link'
  location: 'global'
  tags: tags
  properties: {
    registrationEnabled: false
    virtualNetwork: {
      id: vnetId
    }
  }
}

resource endpoint 'Microsoft.Network/privateEndpoints@2023-11-01' = {
  name: 'pe-${vaultName}'
  location: location
  tags: tags
  properties: {
    subnet: {
      id: privateEndpointSubnetId
    }
    privateLinkServiceConnections: [
      {
        name: 'pe-${vaultName}'
        properties: {
          privateLinkServiceId: vault.id
          groupIds: [
            'vault'
          ]
        }
      }
    ]
  }
}

// Registers the endpoint's address as <vaultName>.privatelink.vaultcore.azure.net.
resource dnsGroup 'Microsoft.Network/privateEndpoints/privateDnsZoneGroups@2023-11-01' = {
  parent: endpoint
  name: 'default'
  properties: {
    privateDnsZoneConfigs: [
      {
        name: 'vaultcore'
        properties: {
          privateDnsZoneId: dnsZoneId
        }
      }
    ]
  }
  dependsOn: [
    dnsZone
  ]
}

// Every sign and certificate read is recorded (who, which key, when): the 'audit'
// category group (AuditEvent, and whatever audit categories Key Vault adds).
resource audit 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'audit'
  scope: vault
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        categoryGroup: 'audit'
        enabled: true
      }
    ]
  }
}

// The broker calls two Key Vault operations: get certificate (the current version's key id,
// thumbprint and public part) and sign (a digest, with the certificate's key). This role
// allows those two data actions and nothing else. The built-in roles are broader: Key
// Vault Crypto User adds key update, backup, encrypt, decrypt, wrap, unwrap and verify,
// and Key Vault Certificate User adds reading secrets, which for a certificate with an
// exportable key would be its private key. Role names are unique per tenant, hence the
// vault's name in it.
resource signerRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(resourceGroup().id, vaultName, 'tokenbroker-signer')
  properties: {
    roleName: 'tokenbroker signer (${vaultName})'
    description: 'tokenbroker: read Key Vault certificates and sign with their keys. No secret read, no key export, no other key operation, no management.'
    type: 'CustomRole'
    permissions: [
      {
        actions: []
        notActions: []
        dataActions: [
          'Microsoft.KeyVault/vaults/certificates/read'
          'Microsoft.KeyVault/vaults/keys/sign/action'
        ]
        notDataActions: []
      }
    ]
    assignableScopes: [
      resourceGroup().id
    ]
  }
}

// Scoped to the vault, which holds nothing but the broker's app certificates. To scope
// to single certificates instead, assign the same role on <vault id>/keys/<name> and
// <vault id>/certificates/<name> after creating each one (docs/DEPLOY.md).
resource signer 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, brokerPrincipalId, 'tokenbroker-signer')
  scope: vault
  properties: {
    roleDefinitionId: signerRole.id
    principalId: brokerPrincipalId
    principalType: 'ServicePrincipal'
    description: 'tokenbroker: read the app certificates and sign client assertions with their keys'
  }
}

output vaultUri string = vault.properties.vaultUri
output vaultId string = vault.id
