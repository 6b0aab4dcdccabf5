# The configuration commands of the user's document (shared/seed/000_a261f5f7a062b684.txt), verbatim.
# Section 1: receive connectors
Get-ReceiveConnector | ft Name,Bindings,RemoteIPRanges

New-ReceiveConnector -Name "InternalRelay" `
  -Server EX01 `
  -Bindings 0.0.0.0:25 `
  -RemoteIPRanges 192.168.0.0/24 `
  -Usage Custom `
  -PermissionGroups AnonymousUsers

Set-ReceiveConnector "InternalRelay" -AuthMechanism "TLS"
Set-ReceiveConnector "InternalRelay" -RequireTLS $true

# Section 2: send connectors
Get-SendConnector | fl Name,AddressSpaces,SmartHosts

New-SendConnector -Name "OutboundInternet" `
  -AddressSpaces "*" `
  -Usage Internet `
  -Internet `
  -DNSRoutingEnabled $true `
  -SmartHostAuthMechanism None `
  -FrontendProxyEnabled $true `
  -SourceTransportServers "EX01"

New-SendConnector -Name "SmartHost Connector" `
  -Usage Internet `
  -AddressSpaces "*" `
  -SmartHosts "smtp.relay.com" `
  -SmartHostAuthMechanism "BasicAuth" `
  -AuthenticationCredential (Get-Credential) `
  -SourceTransportServers "EX01"

# Section 3: TLS
Set-SendConnector "OutboundInternet" -RequireTLS $true
Set-ReceiveConnector "InternalRelay" -RequireTLS $true
