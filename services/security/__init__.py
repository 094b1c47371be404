"""Transport security and roles: TLS/mTLS credentials, the role interceptor, bind rules, throwaway certs.

docs/security.md has the threat model; `engram up --tls` (the default) wires all of it into a
local cluster.
"""
