"""Clients of the secret stores that more than one kind shares (a source and a sink)."""
