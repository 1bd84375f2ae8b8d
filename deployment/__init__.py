"""Deployment helpers: certificates and node keys (certs), loopback stack (local), containers."""
