"""Deployment smoke app (see ../pyproject.toml)."""
