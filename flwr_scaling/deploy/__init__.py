"""Deployment on real SuperNodes: certificates, keys, a local federation."""
