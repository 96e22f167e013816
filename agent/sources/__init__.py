"""Credential sources: where the OAuth2 client id and secret come from."""
